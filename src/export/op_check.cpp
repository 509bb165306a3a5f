// The per-op report of `qlora check-compile`: every operator of a traced graph looked up in the c10
// dispatcher -- can it run on Meta tensors (a Meta kernel, or a composite kernel that covers Meta),
// and is its output shape independent of the data (no data_dependent_output / dynamic_output_shape
// tag)? Those are the two things torch.compile and torch.export need of an op to take it whole.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/ir/ir.h>

#include <algorithm>
#include <iomanip>
#include <map>
#include <sstream>

#include "qlora/export.h"

namespace qlora {

const char* meta_support_name(MetaSupport m) {
  switch (m) {
    case MetaSupport::kernel: return "yes";
    case MetaSupport::composite_implicit: return "composite (implicit)";
    case MetaSupport::composite_explicit: return "composite (explicit)";
    case MetaSupport::none: return "NO";
    case MetaSupport::unknown_op: return "unknown op";
  }
  return "?";
}

OpCheck check_op(const std::string& name, int64_t count) {
  OpCheck c;
  c.name = name;
  c.count = count;
  const size_t ns = name.find("::");
  const size_t dot = name.find('.', ns == std::string::npos ? 0 : ns + 2);  // before the overload name
  const c10::OperatorName op_name(dot == std::string::npos ? name : name.substr(0, dot),
                                  dot == std::string::npos ? "" : name.substr(dot + 1));
  const std::optional<c10::OperatorHandle> h = c10::Dispatcher::singleton().findSchema(op_name);
  if (!h) {
    c.meta = MetaSupport::unknown_op;
    return c;
  }
  using K = c10::DispatchKey;
  if (h->hasKernelForDispatchKey(K::Meta))
    c.meta = MetaSupport::kernel;
  else if (h->hasKernelForDispatchKey(K::CompositeImplicitAutograd))
    c.meta = MetaSupport::composite_implicit;
  else if (h->hasKernelForDispatchKey(K::CompositeExplicitAutograd) ||
           h->hasKernelForDispatchKey(K::CompositeExplicitAutogradNonFunctional))
    c.meta = MetaSupport::composite_explicit;
  else
    c.meta = MetaSupport::none;
  c.data_dependent_output = h->hasTag(at::Tag::data_dependent_output);
  c.dynamic_output_shape = h->hasTag(at::Tag::dynamic_output_shape);
  return c;
}

namespace {

void count_ops(const torch::jit::Block* block, std::map<std::string, int64_t>& counts) {
  for (const torch::jit::Node* n : block->nodes()) {
    for (const torch::jit::Block* b : n->blocks()) count_ops(b, counts);
    const c10::Symbol kind = n->kind();
    if (kind.is_prim()) continue;  // graph plumbing (constants, lists, attributes), not operators
    std::string name = kind.toQualString();
    if (const c10::FunctionSchema* s = n->maybeSchema(); s != nullptr && !s->overload_name().empty())
      name += "." + s->overload_name();
    ++counts[name];
  }
}

}  // namespace

std::vector<OpCheck> check_graph_ops(const torch::jit::Graph& graph) {
  std::map<std::string, int64_t> counts;
  count_ops(graph.block(), counts);
  std::vector<OpCheck> out;
  out.reserve(counts.size());
  for (const auto& [name, n] : counts) out.push_back(check_op(name, n));
  return out;
}

std::string format_op_checks(const std::vector<OpCheck>& ops) {
  size_t width = 24;
  for (const OpCheck& c : ops) width = std::max(width, c.name.size());
  std::ostringstream os;
  int64_t nodes = 0;
  std::vector<std::string> flagged;
  for (const OpCheck& c : ops) {
    nodes += c.count;
    const char* dd = c.data_dependent_output ? "yes (data_dependent_output)"
                     : c.dynamic_output_shape ? "yes (dynamic_output_shape)"
                                              : "no";
    os << "  " << std::left << std::setw(static_cast<int>(width)) << c.name << "  x" << std::setw(4) << c.count
       << "  meta: " << std::setw(20) << meta_support_name(c.meta) << "  data-dependent: " << dd;
    if (c.host_sync) os << "  (host sync: not in the graph)";
    if (c.flagged()) {
      os << "  <-- FLAGGED";
      flagged.push_back(c.name);
    }
    os << "\n";
  }
  os << ops.size() << " distinct ops, " << nodes << " calls: ";
  if (flagged.empty()) {
    os << "clean (every op has a Meta or composite kernel and a data-independent output shape)\n";
  } else {
    os << flagged.size() << " flagged:";
    for (const std::string& f : flagged) os << " " << f;
    os << "\n";
  }
  return os.str();
}

int op_checks_exit_status(const std::vector<OpCheck>& ops) {
  return std::any_of(ops.begin(), ops.end(), [](const OpCheck& c) { return c.flagged(); }) ? 1 : 0;
}

}  // namespace qlora
