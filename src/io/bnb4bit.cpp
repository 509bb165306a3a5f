// bitsandbytes 4-bit safetensors entries <-> NF4Tensor.
// Facts from bitsandbytes (bitsandbytes-foundation/bitsandbytes, commit 95f9af3):
//  - bitsandbytes/nn/modules.py, Linear4bit._save_to_state_dict: every item of
//    quant_state.as_dict(packed=True) is stored under prefix + "weight." + key;
//  - bitsandbytes/functional.py, QuantState.as_dict: tensors absmax, quant_map (the 4-bit code),
//    nested_absmax, nested_quant_map; the non-tensor items quant_type, blocksize,
//    dtype (str(dtype).strip("torch.") -> "bfloat16"), shape (a tuple -> JSON list),
//    nested_blocksize, nested_dtype, nested_offset (offset.item(): a Python float) are packed
//    under "quant_state.bitsandbytes__" + quant_type;
//  - bitsandbytes/utils.py, pack_dict_to_tensor: json.dumps(dict) encoded as UTF-8, a uint8 tensor;
//  - QuantState.from_dict: rejects keys outside valid_qs_keys, reads nested_offset with float();
//  - backends/default/ops.py quantize_4bit: packed is ((q[::2] << 4) | q[1::2]).unsqueeze(1),
//    i.e. uint8 [(n+1)//2, 1].
#include "qlora/shape_str.h"
#include "qlora/bnb4bit.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "qlora/error.h"
#include "qlora/hf_config.h"

namespace qlora {
using nlohmann::json;

std::string python_float_repr(double x) {
  // json.dumps writes NaN/Infinity for non-finite floats (allow_nan=True).
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);  // shortest round trip
  std::string s(buf, res.ptr);
  std::string sign;
  if (s[0] == '-') { sign = "-"; s = s.substr(1); }
  const size_t epos = s.find('e');
  const int exp10 = std::stoi(s.substr(epos + 1));
  std::string digits = s.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int n = static_cast<int>(digits.size());
  const int decpt = exp10 + 1;  // value = 0.DIGITS * 10^decpt
  // CPython float_repr_style 'short', format 'r': exponent form when decpt <= -4 or decpt > 16.
  if (decpt <= -4 || decpt > 16) {
    std::string out = sign + digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    return out + e;
  }
  if (decpt <= 0) return sign + "0." + std::string(-decpt, '0') + digits;
  if (decpt < n) return sign + digits.substr(0, decpt) + "." + digits.substr(decpt);
  return sign + digits + std::string(decpt - n, '0') + ".0";
}

std::string bnb4bit_quant_state_json(const NF4Tensor& t) {
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(t.blocksize) + ", \"dtype\": \"" +
                  torch_dtype_name(t.dtype) + "\", \"shape\": [";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  s += "]";
  if (t.nested) {
    // offset is an fp32 tensor in bnb; .item() widens it to a double exactly.
    s += ", \"nested_blocksize\": " + std::to_string(t.nested_blocksize) + ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
         python_float_repr(static_cast<double>(static_cast<float>(t.offset)));
  }
  return s + "}";
}

NamedTensors bnb4bit_entries(const std::string& w, const NF4Tensor& t) {
  nf4_check(t);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  NamedTensors out;
  out.emplace_back(w, t.packed.reshape({-1, 1}));
  out.emplace_back(w + ".absmax", t.absmax);
  at::Tensor qmap = at::empty({16}, f32);
  std::memcpy(qmap.data_ptr<float>(), nf4_codebook().data(), 16 * sizeof(float));
  out.emplace_back(w + ".quant_map", qmap);
  if (t.nested) {
    out.emplace_back(w + ".nested_absmax", t.absmax2);
    out.emplace_back(w + ".nested_quant_map", t.code2);
  }
  const std::string js = bnb4bit_quant_state_json(t);
  at::Tensor qs = at::empty({static_cast<int64_t>(js.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(qs.data_ptr<uint8_t>(), js.data(), js.size());
  out.emplace_back(w + kBnbQuantStateSuffix, qs);
  return out;
}

namespace {

bool is_pow2_in(int64_t x, int64_t lo, int64_t hi) { return x >= lo && x <= hi && (x & (x - 1)) == 0; }

// The most elements a quant_state shape may claim: far beyond any real weight, and small enough
// that numel + blocksize and numel + 1 (block and byte counts) cannot overflow int64.
constexpr int64_t kMaxElements = int64_t{1} << 60;

}  // namespace

NF4Tensor bnb4bit_from_entries(const std::string& w, const std::map<std::string, at::Tensor>& entries, const std::string& source) {
  const std::string at_w = source + ": " + w;
  // Only the keys QuantState knows (valid_qs_keys) may follow the weight's name.
  static const std::vector<std::string> known = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", kBnbQuantStateSuffix};
  for (const auto& [name, t] : entries) {
    if (name == w) continue;
    const std::string suffix = name.rfind(w + ".", 0) == 0 ? name.substr(w.size()) : name;
    if (suffix == ".quant_state.bitsandbytes__fp4")
      throw UserError(at_w + ": quant_type fp4 is not supported (expected nf4: quant_state.bitsandbytes__nf4)");
    if (std::find(known.begin(), known.end(), suffix) == known.end())
      throw UserError(source + ": unexpected entry '" + name + "' next to quantized weight '" + w +
                      "' (expected .absmax, .quant_map, .nested_absmax, .nested_quant_map, .quant_state.bitsandbytes__nf4)");
  }
  auto get = [&](const std::string& suffix) -> const at::Tensor* {
    auto it = entries.find(w + suffix);
    return it == entries.end() ? nullptr : &it->second;
  };
  auto need = [&](const std::string& suffix) -> const at::Tensor& {
    const at::Tensor* t = get(suffix);
    if (!t) throw UserError(at_w + suffix + ": missing (a bnb-4bit weight needs it)");
    return *t;
  };
  auto expect_dtype = [&](const std::string& suffix, const at::Tensor& t, at::ScalarType dt) {
    if (t.scalar_type() != dt)
      throw UserError(at_w + suffix + ": expected dtype " + scalar_to_safetensors_dtype(dt) + ", found " +
                      std::string(c10::toString(t.scalar_type())));
  };
  auto expect_len = [&](const std::string& suffix, const at::Tensor& t, int64_t n) {
    if (t.dim() != 1 || t.size(0) != n)
      throw UserError(at_w + suffix + ": expected shape [" + std::to_string(n) + "], found " + shape_str(t.sizes()));
  };

  // quant_state JSON
  const at::Tensor& qs_t = need(kBnbQuantStateSuffix);
  expect_dtype(kBnbQuantStateSuffix, qs_t, at::kByte);
  const at::Tensor qs_c = qs_t.contiguous().to(at::kCPU);
  const std::string qs_text(reinterpret_cast<const char*>(qs_c.data_ptr<uint8_t>()), static_cast<size_t>(qs_c.numel()));
  const std::string at_qs = at_w + kBnbQuantStateSuffix;
  json qs;
  try {
    qs = json::parse(qs_text);
  } catch (const json::exception& e) {
    throw UserError(at_qs + ": not valid JSON: " + e.what());
  }
  if (!qs.is_object()) throw UserError(at_qs + ": expected a JSON object, found " + qs.dump());
  auto field = [&](const char* key) -> const json& {
    if (!qs.contains(key)) throw UserError(at_qs + ": missing '" + key + "'");
    return qs[key];
  };
  auto bad = [&](const char* key, const std::string& expected) {
    throw UserError(at_qs + ": '" + key + "': expected " + expected + ", found " + qs[key].dump());
  };

  NF4Tensor t;
  const json& qt = field("quant_type");
  if (!qt.is_string()) bad("quant_type", "\"nf4\"");
  if (qt.get<std::string>() != "nf4") bad("quant_type", "\"nf4\" (fp4 is not supported)");
  const json& bs = field("blocksize");
  if (!bs.is_number_integer() || !is_pow2_in(bs.get<int64_t>(), 32, 4096)) bad("blocksize", "a power of two in 32..4096");
  t.blocksize = bs.get<int64_t>();
  const json& dt = field("dtype");
  if (!dt.is_string()) bad("dtype", "\"float16\", \"bfloat16\" or \"float32\"");
  const std::string dts = dt.get<std::string>();
  if (dts == "float16") t.dtype = at::kHalf;
  else if (dts == "bfloat16") t.dtype = at::kBFloat16;
  else if (dts == "float32") t.dtype = at::kFloat;
  else bad("dtype", "\"float16\", \"bfloat16\" or \"float32\"");
  const json& sh = field("shape");
  if (!sh.is_array() || sh.empty()) bad("shape", "a non-empty list of non-negative integers");
  int64_t elements = 1;
  for (const auto& d : sh) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape", "a non-empty list of non-negative integers");
    const int64_t dim = d.get<int64_t>();
    // Checked before numel() and the block counts below multiply and add with it.
    if (dim != 0 && elements > kMaxElements / dim) bad("shape", "at most 2^60 elements in all");
    elements *= dim;
    t.shape.push_back(dim);
  }
  const int64_t n = t.numel();
  const int64_t nblocks = nf4_num_blocks(n, t.blocksize);

  // nested: the tensors and the JSON fields must agree
  const bool has_nested_tensor = get(".nested_absmax") || get(".nested_quant_map");
  const bool has_nested_json = qs.contains("nested_offset") || qs.contains("nested_blocksize") || qs.contains("nested_dtype");
  if (has_nested_tensor != has_nested_json)
    throw UserError(at_w + ": nested (double) quantization is half there: " +
                    (has_nested_tensor ? std::string("nested_absmax/nested_quant_map present but the quant_state has no nested_* fields")
                                       : std::string("the quant_state has nested_* fields but nested_absmax/nested_quant_map are missing")));
  t.nested = has_nested_tensor;
  if (t.nested) {
    const json& nbs = field("nested_blocksize");
    if (!nbs.is_number_integer() || !is_pow2_in(nbs.get<int64_t>(), 32, 4096)) bad("nested_blocksize", "a power of two in 32..4096");
    t.nested_blocksize = nbs.get<int64_t>();
    const json& ndt = field("nested_dtype");
    if (!ndt.is_string() || ndt.get<std::string>() != "float32") bad("nested_dtype", "\"float32\"");
    const json& off = field("nested_offset");
    if (!off.is_number() || !std::isfinite(off.get<double>())) bad("nested_offset", "a finite number");
    t.offset = static_cast<double>(static_cast<float>(off.get<double>()));  // bnb keeps it as an fp32 tensor
  }

  // packed weight: uint8 [(n+1)/2, 1]; another quant_storage is the same bytes viewed as that type.
  const at::Tensor& packed = need("");
  at::Tensor packed_bytes;
  if (packed.scalar_type() == at::kByte) {
    const bool ok_shape = (packed.dim() == 2 && packed.size(1) == 1) || packed.dim() == 1;
    if (!ok_shape || packed.numel() != (n + 1) / 2)
      throw UserError(at_w + ": packed weight: expected uint8 shape [" + std::to_string((n + 1) / 2) + ", 1] for quant_state shape " +
                      shape_str(t.shape) + ", found " + shape_str(packed.sizes()));
    packed_bytes = packed.reshape({-1});
  } else {
    const int64_t nbytes = packed.numel() * static_cast<int64_t>(packed.element_size());
    if (nbytes != (n + 1) / 2)
      throw UserError(at_w + ": packed weight: expected " + std::to_string((n + 1) / 2) + " bytes for quant_state shape " + shape_str(t.shape) +
                      ", found " + std::to_string(nbytes) + " (" + std::string(c10::toString(packed.scalar_type())) + " " +
                      shape_str(packed.sizes()) + ")");
    packed_bytes = packed.contiguous().reshape({-1}).view(at::kByte);
  }
  t.packed = packed_bytes.contiguous().clone();

  const at::Tensor& absmax = need(".absmax");
  expect_dtype(".absmax", absmax, t.nested ? at::kByte : at::kFloat);
  expect_len(".absmax", absmax, nblocks);
  t.absmax = absmax.contiguous().clone();

  const at::Tensor& qmap = need(".quant_map");
  expect_dtype(".quant_map", qmap, at::kFloat);
  expect_len(".quant_map", qmap, 16);
  {
    // Our kernels use the fixed NF4 codebook: a different map would dequantize to other values.
    const at::Tensor q = qmap.contiguous().to(at::kCPU);
    const float* p = q.data_ptr<float>();
    for (int i = 0; i < 16; ++i)
      if (p[i] != nf4_codebook()[i])
        throw UserError(at_w + ".quant_map: expected the NF4 codebook, found value " + python_float_repr(p[i]) + " at index " +
                        std::to_string(i) + " (expected " + python_float_repr(nf4_codebook()[i]) + ")");
  }

  if (t.nested) {
    const at::Tensor& a2 = need(".nested_absmax");
    expect_dtype(".nested_absmax", a2, at::kFloat);
    expect_len(".nested_absmax", a2, nf4_num_blocks(nblocks, t.nested_blocksize));
    t.absmax2 = a2.contiguous().clone();
    const at::Tensor& c2 = need(".nested_quant_map");
    expect_dtype(".nested_quant_map", c2, at::kFloat);
    expect_len(".nested_quant_map", c2, 256);
    t.code2 = c2.contiguous().clone();
  }
  nf4_check(t);
  return t;
}

bool is_bnb4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& w) {
  return ckpt.contains(w + kBnbQuantStateSuffix) || ckpt.contains(w + ".quant_state.bitsandbytes__fp4");
}

NF4Tensor read_bnb4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& w) {
  std::map<std::string, at::Tensor> entries;
  std::string source = "checkpoint";
  if (ckpt.contains(w)) {
    entries[w] = ckpt.view(w);
    source = ckpt.file_of(w).path().string();
  }
  for (const char* s : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                        ".quant_state.bitsandbytes__fp4"})
    if (ckpt.contains(w + s)) entries[w + s] = ckpt.view(w + s);
  if (!ckpt.contains(w)) throw UserError(source + ": " + w + ": missing (the packed 4-bit weight)");
  return bnb4bit_from_entries(w, entries, source);
}

}  // namespace qlora
