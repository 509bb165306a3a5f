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
  // The pieces of fused_linear_cross_entropy's Autograd kernel, so that its forward and backward
  // are dispatcher calls that AOTAutograd / torch.compile can trace (not differentiable
  // themselves). _fwd: per-token losses [N] fp32 and, when asked, the gradients of their SUM, dx
  // [N,H] in x's dtype and dw [V,H] fp32 ([0] when not asked). _bwd (reduction "none"): dx and dw
  // (w's dtype) of sum(grad_rows * loss_rows), recomputing the logits; [0] when not asked.
  m.def("_fused_linear_cross_entropy_fwd(Tensor x, Tensor w, Tensor labels, int ignore_index, float logit_scale, "
        "float softcap, float z_loss, int chunk_size, bool need_dx, bool need_dw) -> "
        "(Tensor loss_rows, Tensor dx, Tensor dw)");
  m.def("_fused_linear_cross_entropy_bwd(Tensor grad_rows, Tensor x, Tensor w, Tensor labels, int ignore_index, "
        "float logit_scale, float softcap, float z_loss, int chunk_size, bool need_dx, bool need_dw) -> "
        "(Tensor dx, Tensor dw)");
  // The NF4 LoRA linear: y = x deq(W)^T (+ bias) + scale (x A^T) B^T for x [..., in]; W = [out, in]
  // = shape from the NF4 pieces of nf4_dequantize, dequantized to x's dtype; A [r, in] and B [out, r]
  // cast to x's dtype for the GEMMs. Output [..., out] in x's dtype. Differentiable in x, lora_a and
  // lora_b (their gradients in their own dtype); the NF4 pieces and the bias are frozen. No dropout.
  m.def("nf4_lora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset, "
        "int blocksize, SymInt[] shape, Tensor? bias=None, Tensor? lora_a=None, Tensor? lora_b=None, "
        "float scale=1.0) -> Tensor");
  // Fused RMSNorm, SwiGLU and RoPE (include/qlora/fused_layer.h): rms_norm differentiable in x (the norm
  // weight is frozen), swiglu = silu(gate) * up in both. _rms_norm_fwd also returns 1/rms per row
  // (fp32 [rows]); _rms_norm_bwd and _swiglu_bwd are the backward pieces of their Autograd
  // kernels, dispatcher calls so that torch.compile traces them (not differentiable themselves).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("_rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor out, Tensor rstd)");
  m.def("_rms_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("_swiglu_bwd(Tensor grad, Tensor gate, Tensor up) -> (Tensor d_gate, Tensor d_up)");
  // Rotary embedding x * cos + rotate_half(x) * sin, x [B, heads, T, head_dim], cos/sin [B, T,
  // head_dim]; differentiable in x (cos/sin frozen); _rope_bwd: dx from the output's gradient.
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("_rope_bwd(Tensor grad, Tensor cos, Tensor sin) -> Tensor");
}
