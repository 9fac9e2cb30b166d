#pragma once
#include <torch/extension.h>

#define SNCE_CHECK_2D(t, name) TORCH_CHECK((t).dim() == 2, name " must be 2-D, got ", (t).dim(), "-D")
#define SNCE_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())
