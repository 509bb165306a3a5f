// The qlora op library: every op's schema is declared here, once (TORCH_LIBRARY may appear only
// once per namespace). Kernels are registered next to their implementations with
// TORCH_LIBRARY_IMPL (CPU reference, CUDA, Meta, Autograd) in src/ops/<op>_ops.cpp.
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  // NF4 (bitsandbytes layout): see include/qlora/nf4.h. When not nested, absmax is fp32 and
  // absmax2, code2 and offset are empty; when nested, absmax is uint8 and offset a 0-dim fp32.
  m.def("nf4_quantize(Tensor weight, int blocksize=64, bool nested=True) -> "
        "(Tensor packed, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset, "
        "int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor");
  m.def("nf4_dequantize.out(Tensor packed, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset, "
        "int blocksize, SymInt[] shape, ScalarType dtype, *, Tensor(a!) out) -> ()");
  // Fused chunked linear + cross-entropy: see include/qlora/flce.h. Returns fp32: a scalar (mean,
  // sum) or per-token losses [N] (none).
  m.def("fused_linear_cross_entropy(Tensor x, Tensor w, Tensor labels, int ignore_index=-100, "
        "str reduction=\"mean\", float normalizer=0., float logit_scale=1., float softcap=0., float z_loss=0., "
        "int chunk_size=0) -> Tensor");
}
