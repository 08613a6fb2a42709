// The export planned on every rank from the checkpoint's metadata alone: which rank reads which
// shard, and what each layer becomes. The plan owns the checkpoint reader and its layout names the
// metadata by index, so a plan moves like any value.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/comm/layer_gather.h"
#include "adapter_job/convert/base_model.h"
#include "adapter_job/convert/layer_conversion.h"
#include "adapter_job/convert/serving_layout.h"
#include "adapter_job/export.h"
#include "adapter_job/writer/export_sink.h"
#include "adapter_job/writer/output_guard.h"

namespace adapter_job::job {

struct ExportPlan {
  convert::BaseModel base;
  checkpoint::RunDirectory run;
  checkpoint::CheckpointReader reader;
  checkpoint::AdapterLayout layout;
  convert::ConversionSettings settings;
  std::vector<std::vector<convert::OutputTensor>> outputs;  // per layer
  comm::ShardOwnership owners;
  std::optional<std::size_t> integrity_files;  // checked against integrity.json
  std::string integrity_not_checked;           // why not
  // adapter_config.json's exclude_modules: base modules that target_modules would match but whose
  // adapters were left out on purpose (--exclude-adapter-base-prefix), so PEFT leaves them alone.
  std::vector<std::string> exclude_modules;
  ServingTarget target = ServingTarget::kPeft;
  convert::ServingLayout serving;  // adapter_config.json's r and what the layout changed

  // What the sink learns before the first layer: every output tensor, layer by layer, and the
  // adapter's settings (adapter_config.json's inputs).
  writer::ExportAnnouncement Announce(const ExportOptions& options) const;
};

// Nothing in it points into it (the layout and settings hold indices and copies).
static_assert(std::is_nothrow_move_constructible_v<ExportPlan>);

// Runs alike on every rank (so all fail alike): resolves the base model and the run directory,
// checks integrity.json (each rank its share), refuses `outputs` that lie on an input, checks
// the shard files against the metadata, plans the layout and each layer's conversion, and
// assigns shards to ranks. With `verify`, verification that cannot run fails here, before any work.
ExportPlan PlanExport(const ExportOptions& options, bool verify,
                      const std::vector<writer::NamedPath>& outputs, int world_size, int rank);

// What PlanExport refuses to see on an input: the sink's outputs, then --report. Refuses
// verification asked of a sink whose output cannot be verified.
std::vector<writer::NamedPath> CheckedOutputs(const writer::ExportSink& sink,
                                              const ExportOptions& options);

// The export's verification settings for the plan's base model and iteration; the adapter (and
// merged model) to verify are the caller's to fill in.
verify::VerifyOptions VerifyOptionsFor(const ExportOptions& options, const ExportPlan& plan);

}  // namespace adapter_job::job
