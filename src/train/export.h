// `amaq export`: what a finished run trained, as one PEFT adapter or merged into the base model.
#pragma once
#include <string>

namespace amaq::train {

/// The client's LoRA from RUN's last checkpoint and the server's from RUN/server_adapter, merged
/// into one PEFT adapter in `out`.
void export_adapter(const std::string& run_dir, const std::string& out);
/// The base checkpoint with both sides' training written in (full weights as trained, LoRA merged
/// as W + scale * B A), as an HF model directory in `out` (model.safetensors, config and tokenizer
/// files). A server that trained full weights keeps them: its run directory (`server_run_dir`,
/// default RUN/server as `amaq train` uses) must be readable here. A model with tied embeddings whose
/// two-part split trained the client's embedding and the server's head apart is written untied
/// (lm_head.weight, and tie_word_embeddings false in config.json).
void export_merged(const std::string& run_dir, const std::string& out, const std::string& server_run_dir = "");

}  // namespace amaq::train
