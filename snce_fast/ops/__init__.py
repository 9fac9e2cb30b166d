"""The ops: the eager PyTorch reference of every SAE operation (`reference`), the dispatcher that picks
Triton, the C++ extension or the reference per device (`backend`), the C++ op faces (`cpp_ops`, `_ext`)
and the streaming activation histograms (`histogram`). Nothing here knows about models or files."""
