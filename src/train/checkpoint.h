// Checkpoints: a directory `ROOT/step-NNNNNNNN/` of files that appears all at once. Every file is
// written and fsynced inside `step-NNNNNNNN.tmp.PID/`, which is then renamed into place, so a crash
// at any moment leaves either the whole checkpoint or none of it.
//
// Both sides checkpoint through save_side_checkpoint / load_side_checkpoint: the side's trained
// tensors (state.safetensors) and optimizer (optim.pt), what its link keeps (AMAQ gates and their
// optimizer, AQ-SGD memories, the backward budget), the CPU generator, and state.json.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/torch_io.h"
#include "quant/link.h"
#include "train/side.h"

namespace amaq::train {

using CheckpointFiles = std::map<std::string, std::string>;  // file name -> bytes

std::string checkpoint_path(const std::string& root, int64_t step);
/// Writes `files` as the checkpoint of `step` (replacing one of the same step).
void write_checkpoint(const std::string& root, int64_t step, const CheckpointFiles& files);
/// Complete checkpoints under `root`, ascending by step (missing root: none).
std::vector<int64_t> list_checkpoints(const std::string& root);
/// Removes all but the newest `keep` checkpoints.
void prune_checkpoints(const std::string& root, int keep);
/// Removes `step-N.tmp.PID` directories under `root` that a process which no longer exists left
/// (an interrupted checkpoint); those of live processes stay. Returns how many it removed.
int remove_stale_temps(const std::string& root);

/// Writes one side's checkpoint of `step` under `root` (`fields` and the link's go into
/// state.json), then keeps only the newest `keep`. A U-shaped split's second link, at the tail
/// split, keeps its tensors and files under "tail." and its fields under "tail_link".
void save_side_checkpoint(const std::string& root, int64_t step, Side& side, quant::Link& link, nlohmann::json fields,
                          int keep, quant::Link* tail_link = nullptr);
/// Restores a side (unless null), its links and the CPU generator from checkpoint directory `dir`;
/// returns state.json. A damaged file throws amaq::Error naming it.
nlohmann::json load_side_checkpoint(const std::string& dir, Side* side, quant::Link& link,
                                    quant::Link* tail_link = nullptr);

}  // namespace amaq::train
