// The qlora op library: every op's schema is declared here, once (TORCH_LIBRARY may appear only
// once per namespace). Kernels are registered next to their implementations with
// TORCH_LIBRARY_IMPL (CPU reference, CUDA, Meta, Autograd) in src/ops/<op>_ops.cpp.
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  // NF4 (bitsandbytes layout): see include/qlora/nf4.h.
}
