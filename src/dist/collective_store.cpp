// The TCPStore engine: collectives for CPU ranks in separate processes, exchanged as whole tensors
// through the c10d TCPStore used for the rendezvous. libtorch ships no Gloo headers, so Gloo cannot
// be used from C++; this engine is slow (every rank fetches every other rank's tensors through rank
// 0's store) but needs nothing beyond libtorch, and it is meant for small models and CI.
//
// Op k: rank r sets key "q/<k>/<r>" to its message (the op's description, then the raw bytes of
// its inputs), gets every other rank's key (get() blocks until the key exists, up to the store's
// timeout), checks that all ranks called the same op on matching tensors, and computes its result
// with the in-process engine's rank-order arithmetic (so both agree bit for bit). Then it deletes
// its own key of op k-2: a rank can only have reached op k after reading every key of op k-1, which
// every rank set after finishing op k-2, so no one reads op k-2's keys any more.
#include <c10/util/Exception.h>

#include <cstring>
#include <stdexcept>

#include "dist/collective_internal.h"

namespace qlora::dist_detail {
namespace {

using Bytes = std::vector<uint8_t>;

template <class T>
void put(Bytes& b, const T& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof(T));
}

// Reads a message, or throws on a short one (it would be a bug, or a foreign key in the store).
struct Reader {
  const Bytes& b;
  size_t pos = 0;
  template <class T>
  T get() {
    T v;
    take(&v, sizeof(T));
    return v;
  }
  void take(void* dst, size_t n) {
    if (pos + n > b.size()) throw std::runtime_error("tcpstore collective: truncated message");
    if (n) std::memcpy(dst, b.data() + pos, n);
    pos += n;
  }
};

void put_descs(Bytes& b, const std::vector<TensorDesc>& ds) {
  put(b, static_cast<uint32_t>(ds.size()));
  for (const auto& d : ds) {
    put(b, d.dtype);
    put(b, static_cast<uint8_t>(d.contiguous));
    put(b, d.numel);
  }
}

std::vector<TensorDesc> get_descs(Reader& r) {
  std::vector<TensorDesc> ds(r.get<uint32_t>());
  for (auto& d : ds) {
    d.dtype = r.get<int8_t>();
    d.contiguous = r.get<uint8_t>() != 0;
    d.numel = r.get<int64_t>();
  }
  return ds;
}

// A message: the description, then (when `payload` is not empty) the bytes of each payload tensor,
// which are contiguous CPU tensors matching desc.ins.
Bytes encode(const OpDesc& desc, const std::vector<at::Tensor>& payload) {
  Bytes b;
  put(b, static_cast<uint8_t>(desc.kind));
  put(b, static_cast<int32_t>(desc.root));
  put_descs(b, desc.outs);
  put_descs(b, desc.ins);
  put(b, static_cast<uint8_t>(!payload.empty()));
  for (const auto& t : payload) {
    const auto* p = static_cast<const uint8_t*>(t.const_data_ptr());
    b.insert(b.end(), p, p + t.nbytes());
  }
  return b;
}

OpDesc decode_desc(Reader& r) {
  OpDesc d;
  d.kind = static_cast<OpKind>(r.get<uint8_t>());
  d.root = r.get<int32_t>();
  d.outs = get_descs(r);
  d.ins = get_descs(r);
  return d;
}

// The payload tensors after decode_desc (empty when the sender sent none).
std::vector<at::Tensor> decode_payload(Reader& r, const OpDesc& d) {
  std::vector<at::Tensor> ts;
  if (!r.get<uint8_t>()) return ts;
  for (const auto& in : d.ins) {
    at::Tensor t = at::empty({in.numel}, at::TensorOptions().dtype(static_cast<at::ScalarType>(in.dtype)));
    r.take(t.mutable_data_ptr(), t.nbytes());
    ts.push_back(t);
  }
  if (r.pos != r.b.size()) throw std::runtime_error("tcpstore collective: message longer than its description");
  return ts;
}

class TcpStoreCollective final : public Collective {
 public:
  TcpStoreCollective(c10::intrusive_ptr<c10d::Store> store, int rank, int world)
      : store_(std::move(store)), rank_(rank), world_(world) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string engine() const override { return "tcpstore"; }

  CollectiveWork all_gather(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    auto parts = exchange(OpKind::all_gather, -1, outs, ins, true);
    for (size_t i = 0; i < ins.size(); ++i) {
      if (outs[i].is_cpu()) {
        gather_into(outs[i], column(parts, i));
      } else {
        at::Tensor cpu = at::empty({outs[i].numel()}, outs[i].options().device(at::kCPU));
        gather_into(cpu, column(parts, i));
        outs[i].copy_(cpu.view(outs[i].sizes()));
      }
    }
    return {};
  }

  CollectiveWork reduce_scatter(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    auto parts = exchange(OpKind::reduce_scatter, -1, outs, ins, true);
    for (size_t i = 0; i < ins.size(); ++i) {
      at::Tensor sum = reduce_chunk(column(parts, i), rank_, outs[i].numel(), ReduceOp::sum);
      outs[i].copy_(sum.view(outs[i].sizes()));
    }
    return {};
  }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    auto parts = exchange(op == ReduceOp::sum ? OpKind::all_reduce_sum : OpKind::all_reduce_max, -1, {}, {t}, true);
    t.copy_(reduce_chunk(column(parts, 0), 0, t.numel(), op).view(t.sizes()));
  }

  void broadcast(at::Tensor& t, int root) override {
    auto parts = exchange(OpKind::broadcast, root, {}, {t}, rank_ == root);
    if (rank_ != root) t.copy_(parts[root][0].view(t.sizes()));
  }

  void barrier() override { exchange(OpKind::barrier, -1, {}, {}, false); }

 private:
  static std::vector<at::Tensor> column(const std::vector<std::vector<at::Tensor>>& parts, size_t i) {
    std::vector<at::Tensor> v;
    for (const auto& p : parts) v.push_back(p[i]);
    return v;
  }

  std::string key(uint64_t op, int rank) const { return "q/" + std::to_string(op) + "/" + std::to_string(rank); }

  // One op's exchange: every rank's inputs as contiguous CPU tensors (index = rank; empty for a
  // rank that sent none), after checking that all ranks agree on the op. Throws the same error on
  // every rank when they do not.
  std::vector<std::vector<at::Tensor>> exchange(OpKind kind, int root, const std::vector<at::Tensor>& outs,
                                                const std::vector<at::Tensor>& ins, bool send_inputs) {
    const uint64_t op = next_op_++;
    const char* name = op_name(kind);
    const OpDesc mine = describe_op(kind, root, outs, ins);
    std::vector<at::Tensor> payload;
    if (send_inputs)
      for (const auto& t : ins) payload.push_back(t.to(at::kCPU).contiguous());

    std::vector<OpDesc> descs(world_);
    std::vector<std::vector<at::Tensor>> parts(world_);
    std::vector<Bytes> messages(world_);
    try {
      store_->set(key(op, rank_), encode(mine, payload));
      for (int q = 0; q < world_; ++q)
        if (q != rank_) messages[q] = store_->get(key(op, q));
      if (op >= 2) store_->deleteKey(key(op - 2, rank_));
    } catch (const c10::Error& e) {
      std::string why = e.what_without_backtrace();
      throw std::runtime_error(std::string("tcpstore ") + name + " (op " + std::to_string(op) + ") on rank " +
                               std::to_string(rank_) + " failed: " + why.substr(0, why.find('\n')));
    }

    std::vector<Reader> readers;
    readers.reserve(world_);
    for (int q = 0; q < world_; ++q) {
      readers.push_back(Reader{messages[q]});
      descs[q] = q == rank_ ? mine : decode_desc(readers[q]);
    }
    const std::string err = check_op(descs);
    if (!err.empty()) throw std::runtime_error(err);
    for (int q = 0; q < world_; ++q) parts[q] = q == rank_ ? payload : decode_payload(readers[q], descs[q]);
    return parts;
  }

  c10::intrusive_ptr<c10d::Store> store_;
  int rank_, world_;
  uint64_t next_op_ = 0;
};

}  // namespace

std::shared_ptr<Collective> make_tcpstore_collective(c10::intrusive_ptr<c10d::Store> store, int rank, int world) {
  return std::make_shared<TcpStoreCollective>(std::move(store), rank, world);
}

}  // namespace qlora::dist_detail
