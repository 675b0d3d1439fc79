// amaq server / client / train / export: split fine-tuning as two processes over TCP/TLS, or both
// sides in one process (in-process channel or loopback TCP) with the same code paths.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <atomic>
#include <cmath>
#include <thread>

#include "app/commands.h"
#include "app/config_toml.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/runtime.h"
#include "train/export.h"
#include "train/session.h"
#include "train/status.h"
#include "wire/link_emulator.h"
#include "wire/packet_link.h"
#include "wire/tcp.h"

namespace amaq::app {
namespace {

using train::ClientConfig;
using train::ServerConfig;
using train::SideOptions;

std::pair<std::string, uint16_t> host_port(const std::string& text, const char* flag) {
  const auto colon = text.rfind(':');
  int port = -1;
  if (colon != std::string::npos) {
    try {
      port = std::stoi(text.substr(colon + 1));
    } catch (const std::exception&) {
    }
  }
  if (colon == std::string::npos || colon == 0 || port < 0 || port > 65535) {
    throw Error(std::string(flag) + " '" + text + "' is not HOST:PORT",
                "e.g. 127.0.0.1:7000 or server.example.org:7000");
  }
  return {text.substr(0, colon), static_cast<uint16_t>(port)};
}

std::string read_token(const std::string& path) {
  if (path.empty()) return {};
  std::string t = read_file(path);
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.pop_back();
  if (t.size() < 16)
    throw Error("token in " + path + " is shorter than 16 characters", "generate one: openssl rand -hex 32 > " + path);
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
    spdlog::warn("token file {} can be read by other users (mode {:o}); chmod 600 {}", path, st.st_mode & 0777, path);
  }
  return t;
}

void add_side_options(CLI::App& app, SideOptions* side, const std::string& prefix, const std::string& who) {
  app.add_flag("--" + prefix + "full", side->full, "train all of the " + who + "'s weights instead of LoRA");
  app.add_option("--" + prefix + "lora-r", side->lora_r, "LoRA rank on the " + who)->check(CLI::Range(1, 4096));
  app.add_option("--" + prefix + "lora-alpha", side->lora_alpha, "LoRA alpha on the " + who)
      ->check(CLI::Validator(
          [](std::string& v) {
            const double x = std::strtod(v.c_str(), nullptr);
            return std::isfinite(x) && x > 0 ? std::string() : "LoRA alpha must be a positive finite number, got " + v;
          },
          "POSITIVE", "positive"));
  app.add_option("--" + prefix + "lora-dropout", side->lora_dropout, "LoRA dropout on the " + who)
      ->check(CLI::Range(0.0, 0.99));
  app.add_flag("--" + prefix + "rslora", side->rslora, "scale LoRA by alpha/sqrt(r) on the " + who);
  app.add_option("--" + prefix + "lora-targets", side->targets,
                 "modules to adapt on the " + who + " (all-linear, q_proj,v_proj, ...)")
      ->delimiter(',');
  app.add_option("--" + prefix + "adapter", side->init_adapter, "start the " + who + "'s LoRA from this PEFT adapter");
  app.add_option("--" + prefix + "device", side->device, "where the " + who + " computes: cpu, cuda, cuda:N")
      ->capture_default_str();
  app.add_flag("--" + prefix + "activation-checkpointing", side->activation_checkpointing,
               "recompute each of the " + who + "'s layers in backward instead of keeping its activations");
  app.add_option("--" + prefix + "dtype", side->dtype,
                 "the " + who + "'s compute dtype: fp32, or bf16 (LoRA, optimizer and norms stay fp32)")
      ->capture_default_str();
  if (who == "server") {
    app.add_flag("--" + prefix + "cuda-graph", side->cuda_graph,
                 "capture the server's micro-batch (forward, loss, backward) as a CUDA graph once per shape and "
                 "replay it: one launch instead of hundreds (GPU, no LoRA dropout or activation checkpointing)");
  }
}

// The codec flags as written; parsed (map files read, errors named) before anything starts.
struct CodecArgs {
  std::string fwd = "none:fp32", bwd = "none:fp32", tail_fwd = "none:fp32", tail_bwd = "none:fp32";
  /// The codecs at the split, and at the tail split when `tail_split` is set (else left as they are).
  void parse_into(quant::CodecSpec* fwd_spec, quant::CodecSpec* bwd_spec, int64_t tail_split = 0,
                  quant::CodecSpec* tail_fwd_spec = nullptr, quant::CodecSpec* tail_bwd_spec = nullptr) const {
    *fwd_spec = quant::CodecSpec::parse(fwd);
    *bwd_spec = quant::CodecSpec::parse(bwd);
    if (tail_split == 0) return;
    *tail_fwd_spec = quant::CodecSpec::parse(tail_fwd);
    *tail_bwd_spec = quant::CodecSpec::parse(tail_bwd);
  }
};

void add_codec_options(CLI::App& app, CodecArgs* a, int64_t* tail_split) {
  app.add_option("--fwd-codec", a->fwd,
                 "activation codec: none:fp32|none:bf16, fixed:bits=4,gran=group, amaq:budget=4, aqsgd:bits=4");
  app.add_option("--bwd-codec", a->bwd, "gradient codec (aqsgd here means direct quantization)");
  app.add_option("--tail-split", *tail_split,
                 "U-shaped split: the client also keeps layers [M, L), the head and the loss, so labels never "
                 "leave it; the server keeps [K, M) (0 = no tail)");
  app.add_option("--tail-fwd-codec", a->tail_fwd,
                 "with --tail-split: codec of the activations at M (server -> client)");
  app.add_option("--tail-bwd-codec", a->tail_bwd, "with --tail-split: codec of their gradient (client -> server)");
}

struct ClientArgs {
  ClientConfig cfg;
  CodecArgs codecs;
  std::string connect, tls_ca, tls_cert, tls_key, token_file;
};

void add_client_options(CLI::App& app, ClientConfig* c, CodecArgs* codecs) {
  app.add_option("--model", c->model, "HF model directory (config.json + safetensors)")->required();
  app.add_option("--split", c->split, "the client keeps layers [0, K)")->required();
  app.add_option("--run-dir", c->run_dir, "where metrics, checkpoints and the summary go")->required();
  app.add_option("--data", c->data, "training data (.txt, or .jsonl with text | prompt+completion | text+label)")
      ->required();
  app.add_option("--val-data", c->val_data, "validation data (same formats)");
  app.add_option("--val-fraction", c->val_fraction, "hold out this fraction of --data for validation")
      ->check(CLI::Range(0.0, 0.9));
  app.add_option("--tokenizer", c->tokenizer, "auto (the model's), byte, or a tokenizer file");
  app.add_option("--batch", c->batch, "sequences per micro-batch")->check(CLI::Range(1, 4096));
  app.add_option("--seq-len", c->seq_len, "tokens per sequence")->check(CLI::Range(2, 1 << 20));
  app.add_flag("--beyond-positions", c->beyond_positions,
               "allow --seq-len beyond the model's max_position_embeddings (a model that extrapolates)");
  app.add_option("--steps", c->schedule.steps, "optimizer steps");
  app.add_option("--micro-batches", c->schedule.micro_batches, "gradient accumulation: micro-batches per step");
  app.add_option("--lr", c->schedule.lr, "peak learning rate (AdamW)");
  app.add_option("--warmup", c->schedule.warmup, "linear warm-up steps");
  app.add_option("--min-lr-ratio", c->schedule.min_lr_ratio, "cosine decay ends at lr * this");
  app.add_option("--weight-decay", c->schedule.weight_decay, "AdamW weight decay");
  app.add_option("--clip", c->schedule.clip, "global gradient-norm clip over both sides (0 = off)");
  app.add_option("--gate-lr", c->schedule.gate_lr, "learning rate of the AMAQ bit gates");
  app.add_option("--seed", c->schedule.seed, "seed of data order and LoRA init");
  add_codec_options(app, codecs, &c->tail_split);
  add_side_options(app, &c->side, "", "client");
  app.add_option("--checkpoint-every", c->checkpoint_every, "checkpoint every N steps (and always at the end)");
  app.add_option("--keep-checkpoints", c->keep_checkpoints, "checkpoints kept per side")->check(CLI::Range(1, 1000));
  app.add_option("--eval-every", c->eval_every, "evaluate every N steps (and at the end)");
  app.add_option("--eval-batches", c->eval_batches, "batches per evaluation (0 = all)");
  app.add_flag("--resume", c->resume, "continue the run in --run-dir from its last checkpoint");
  app.add_option("--retries", c->retries, "reconnects after a dropped connection (resuming from the last checkpoint)");
  app.add_option("--busy-wait", c->busy_wait,
                 "seconds to keep asking a busy server again (with back-off) before giving up")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--stop-after", c->stop_after,
                 "leave after N steps as if interrupted (checkpointed; resume with --resume)");
  app.add_flag("--quiet", c->quiet, "no progress output");
  app.add_flag("--progress", c->progress_bar, "draw the progress bar even when stderr is not a terminal");
}

void add_in_flight_option(CLI::App& app, ClientConfig* c, int64_t default_value) {
  c->in_flight = default_value;
  app.add_option("--in-flight", c->in_flight,
                 "micro-batches whose activations are sent before the first gradient is awaited (1 = serial)")
      ->check(CLI::Range(1, 64));
}

int run_client(ClientArgs& a, const CLI::App& app) {
  ClientConfig& c = a.cfg;
  compute_options(c.side.device, c.side.dtype);  // refused here, before anything loads
  c.resolved = resolved_options(app);
  a.codecs.parse_into(&c.fwd_codec, &c.bwd_codec, c.tail_split, &c.tail_fwd_codec, &c.tail_bwd_codec);
  c.token = read_token(a.token_file);
  auto [host, port] = host_port(a.connect, "--connect");
  wire::ClientOptions opt(host, port);
  if (!a.tls_ca.empty())
    opt.tls({a.tls_cert, a.tls_key, a.tls_ca});
  else if (!wire::is_loopback(host))
    spdlog::warn("connecting to {} without TLS: activations cross the network in the clear", host);
  train::ClientTrainer trainer(c);
  trainer.run([&](std::unique_ptr<wire::Channel>* out) { return wire::connect(opt, out); });
  return 0;
}

struct ServerArgs {
  ServerConfig cfg;
  CodecArgs codecs;
  std::string listen = "127.0.0.1:7000", tls_cert, tls_key, tls_ca, token_file;
  bool insecure = false;
  int max_sessions = 16;
  int max_unauthenticated = 64, max_unauthenticated_per_address = 8;
  int64_t exit_after_runs = 0;
  std::string status_listen;
  double run_memory_budget_mb = 0;
  double idle_timeout = 600;
  double stop_grace = 10;
};

void add_server_options(CLI::App& app, ServerArgs* a) {
  app.add_option("--model", a->cfg.model, "HF model directory (config.json + safetensors)")->required();
  app.add_option("--split", a->cfg.split, "the server keeps layers [K, L)")->required();
  app.add_option("--run-dir", a->cfg.run_dir, "one subdirectory per client run: checkpoints and metrics")->required();
  app.add_option("--listen", a->listen, "HOST:PORT to listen on (port 0: any free port, printed)");
  app.add_option("--tls-cert", a->tls_cert, "server certificate (PEM)");
  app.add_option("--tls-key", a->tls_key, "server private key (PEM)");
  app.add_option("--tls-ca", a->tls_ca, "require client certificates signed by this CA (mutual TLS)");
  app.add_flag("--insecure", a->insecure, "allow plain TCP on a non-loopback address");
  app.add_option("--token-file", a->token_file, "file with the shared token clients must prove they hold");
  add_codec_options(app, &a->codecs, &a->cfg.tail_split);
  app.add_flag("--client-codecs", a->cfg.client_codecs,
               "serve each run with the codecs its client asks for (any spec this build can serve) instead of "
               "requiring the server's --fwd-codec/--bwd-codec");
  add_side_options(app, &a->cfg.side, "", "server");
  app.add_option("--keep-checkpoints", a->cfg.keep_checkpoints, "checkpoints kept per run")->check(CLI::Range(1, 1000));
  app.add_option("--max-sessions", a->max_sessions, "authenticated sessions served at once")
      ->check(CLI::Range(1, 4096));
  app.add_option("--max-unauthenticated", a->max_unauthenticated,
                 "connections still authenticating, in total (more are closed at once)")
      ->check(CLI::Range(1, 65536));
  app.add_option("--max-unauthenticated-per-address", a->max_unauthenticated_per_address,
                 "connections still authenticating from one client address")
      ->check(CLI::Range(1, 65536));
  app.add_option("--max-runs", a->cfg.max_runs,
                 "runs trained at once; a client beyond it is told the server is busy and asks again (0 = no limit)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--run-memory-budget", a->run_memory_budget_mb,
                 "MB that all live runs may own together (LoRA, gradients, AdamW; a full run's own weights); "
                 "a run that does not fit now waits, one that never fits is refused (0 = no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--status-listen", a->status_listen,
                 "HOST:PORT for the status page (/metrics for Prometheus, / for people); off loopback it needs "
                 "--token-file, sent as 'Authorization: Bearer <token>'");
  app.add_option("--exit-after-runs", a->exit_after_runs,
                 "exit after this many runs ended with BYE (0 = serve until SIGINT/SIGTERM)");
  app.add_option("--idle-timeout", a->idle_timeout, "seconds of silence before a session is dropped");
  app.add_option("--stop-grace", a->stop_grace,
                 "after SIGTERM, seconds sessions get to reach a step boundary before they are cut");
}

// The first SIGTERM/SIGINT: no new connections; each session stops at its next step boundary (its
// client checkpoints that step and exits with a hint to --resume); sessions still open after
// `grace` seconds are cut. A second signal exits at once (checkpoints are atomic, so the last
// complete one stays valid).
void stop_on_signal(int sig, wire::Server& server, train::TrainServer& srv, double grace, const sigset_t& sigs) {
  spdlog::info(
      "signal {}: stopping: no new sessions, live ones stop at their next step (within {} s); a second "
      "signal exits at once",
      sig, grace);
  server.stop_accepting();
  srv.request_stop();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace);
  timespec tick{0, 50 * 1000 * 1000};
  while (server.live_sessions() > 0 && std::chrono::steady_clock::now() < deadline) {
    const int again = sigtimedwait(&sigs, nullptr, &tick);
    if (again == SIGINT || again == SIGTERM) {
      spdlog::warn("signal {} again: exiting now, {} sessions cut", again, server.live_sessions());
      spdlog::shutdown();
      std::_Exit(128 + again);
    }
  }
  if (server.live_sessions() > 0) {
    spdlog::warn("{} sessions still open after {} s: closing them", server.live_sessions(), grace);
    server.close_sessions();
  }
}

int run_server(ServerArgs& a, const CLI::App& app) {
  compute_options(a.cfg.side.device, a.cfg.side.dtype);  // refused at start, not when a client comes
  a.codecs.parse_into(&a.cfg.fwd_codec, &a.cfg.bwd_codec, a.cfg.tail_split, &a.cfg.tail_fwd_codec,
                      &a.cfg.tail_bwd_codec);
  a.cfg.token = read_token(a.token_file);
  a.cfg.run_memory_budget = static_cast<uint64_t>(a.run_memory_budget_mb * (1 << 20));
  a.cfg.idle_timeout = std::chrono::milliseconds(static_cast<int64_t>(a.idle_timeout * 1000));
  auto [host, port] = host_port(a.listen, "--listen");
  if (a.tls_cert.empty() != a.tls_key.empty())
    throw Error("--tls-cert and --tls-key go together", "give both, or neither with --insecure");
  if (a.cfg.token.empty()) spdlog::warn("no --token-file: any client that reaches this port can train");
  auto rows = resolved_options(app);
  std::vector<std::vector<std::string>> table{{"option", "value"}};
  for (auto& [k, v] : rows) table.push_back({k, v});
  std::fprintf(stderr, "%s", train::format_table(table).c_str());

  // Signals are taken by this thread only (sigtimedwait below), never by session threads.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  // Session threads come and go; measured (tools/shared_server_memory.sh): peak over (weights + N x
  // what a run owns) 1.060 -> 1.026 with 8 runs, 1.135 -> 1.065 with 16.
  limit_malloc_arenas(2);
  train::TrainServer srv(a.cfg);
  wire::ServerOptions opt = srv.tcp_options(port);
  opt.host(host).insecure(a.insecure).max_sessions(a.max_sessions);
  opt.max_unauthenticated(a.max_unauthenticated, a.max_unauthenticated_per_address);
  if (!a.tls_cert.empty()) opt.tls({a.tls_cert, a.tls_key, a.tls_ca}, !a.tls_ca.empty());
  std::atomic<int64_t> finished{0};
  wire::Server server(opt, [&](wire::Channel& ch, const wire::SessionContext& ctx) {
    spdlog::info("session {} from {}", ctx.id, ctx.peer);
    if (srv.serve(ch, ctx).ok()) ++finished;
  });
  std::unique_ptr<wire::StatusServer> status;
  if (!a.status_listen.empty()) {
    auto [status_host, status_port] = host_port(a.status_listen, "--status-listen");
    status = std::make_unique<wire::StatusServer>(
        wire::StatusServerOptions{status_host, status_port, wire::is_loopback(status_host) ? "" : a.cfg.token},
        [&](const std::string& path) { return train::status_response(path, train::status_snapshot(srv, server)); });
    std::fprintf(stdout, "status on http://%s:%u/\n", status_host.c_str(), status->port());
  }
  std::fprintf(stdout, "listening on %s:%u\n", host.c_str(), server.port());
  std::fflush(stdout);
  spdlog::info("amaq server: layers [{}, {}) of {}, {} / {}{}, {}", a.cfg.split,
               a.cfg.tail_split ? std::to_string(a.cfg.tail_split) : "L", a.cfg.model, a.codecs.fwd, a.codecs.bwd,
               a.cfg.tail_split
                   ? ", tail " + a.codecs.tail_fwd + " / " + a.codecs.tail_bwd + " (labels stay on the client)"
                   : "",
               a.tls_cert.empty() ? "plain TCP" : "TLS 1.3");
  spdlog::info("each run owns about {:.1f} MB here ({}), beside the weights all runs share",
               static_cast<double>(srv.run_bytes()) / 1e6,
               a.cfg.side.full ? "its weights, gradients and AdamW state" : "its adapter, gradients and AdamW state");
  timespec tick{0, 200 * 1000 * 1000};
  while (a.exit_after_runs <= 0 || finished < a.exit_after_runs) {
    const int sig = sigtimedwait(&sigs, nullptr, &tick);
    if (sig == SIGINT || sig == SIGTERM) {
      stop_on_signal(sig, server, srv, a.stop_grace, sigs);
      break;
    }
  }
  server.stop();
  spdlog::info("served {} sessions ({} failed), {} steps", server.sessions_started(), server.sessions_failed(),
               srv.steps_served());
  return 0;
}

struct TrainArgs {
  ClientConfig cfg;
  CodecArgs codecs;
  SideOptions server_side;
  bool server_side_given = false;
  std::string transport = "inproc";
};

int run_train(TrainArgs& a, const CLI::App& app) {
  ClientConfig& c = a.cfg;
  compute_options(c.side.device, c.side.dtype);  // refused here, before anything loads
  compute_options(a.server_side.device, a.server_side.dtype);
  c.resolved = resolved_options(app);
  a.codecs.parse_into(&c.fwd_codec, &c.bwd_codec, c.tail_split, &c.tail_fwd_codec, &c.tail_bwd_codec);
  ServerConfig s;
  s.model = c.model;
  s.split = c.split;
  s.run_dir = join_path(c.run_dir, "server");
  s.side = a.server_side;
  s.fwd_codec = c.fwd_codec;
  s.bwd_codec = c.bwd_codec;
  s.tail_split = c.tail_split;
  s.tail_fwd_codec = c.tail_fwd_codec;
  s.tail_bwd_codec = c.tail_bwd_codec;
  s.keep_checkpoints = c.keep_checkpoints;
  if (a.transport == "tcp") s.token = c.token = random_hex(32);
  train::TrainServer srv(s);
  if (a.transport == "tcp") {
    wire::Server server(srv.tcp_options(0),
                        [&](wire::Channel& ch, const wire::SessionContext& ctx) { srv.serve(ch, ctx); });
    train::ClientTrainer(c).run([&](std::unique_ptr<wire::Channel>* out) {
      return wire::connect(wire::ClientOptions("127.0.0.1", server.port()).max_payload(srv.max_payload()), out);
    });
    return 0;
  }
  train::ClientTrainer trainer(c);
  std::vector<std::thread> sessions;
  uint64_t next_id = 1;
  try {
    trainer.run([&](std::unique_ptr<wire::Channel>* out) {
      auto [client_end, server_end] = wire::make_in_process_pair(srv.max_payload());
      sessions.emplace_back(
          [&srv, ch = std::shared_ptr<wire::Channel>(std::move(server_end)), id = next_id++] { srv.serve(*ch, id); });
      *out = std::move(client_end);
      return wire::Status::Ok();
    });
  } catch (...) {
    for (auto& t : sessions) t.join();
    throw;
  }
  for (auto& t : sessions) t.join();
  return 0;
}

}  // namespace

Run add_server(CLI::App& app) {
  app.option_defaults()->always_capture_default();
  auto a = std::make_shared<ServerArgs>();
  add_server_options(app, a.get());
  auto config = use_toml_config(app);
  return [a, &app, config] {
    config();
    return run_server(*a, app);
  };
}

// A slow link in user space between a client and a server on this machine (wire/link_emulator.h).
Run add_emulate_link(CLI::App& app) {
  auto listen = std::make_shared<uint16_t>(0);
  auto to = std::make_shared<std::string>();
  auto link = std::make_shared<std::string>("100mbit/20ms");
  auto netns = std::make_shared<std::string>();
  auto loss = std::make_shared<double>(0.0);
  app.add_option("--listen-port", *listen, "port on 127.0.0.1 the client connects to (0 = any free one)");
  app.add_option("--to", *to, "the server, HOST:PORT (the TCP relay)");
  app.add_option("--link", *link, "rate and round-trip time, e.g. 100mbit/20ms, 1gbit/2ms, 10mbit/40ms")
      ->capture_default_str();
  app.add_option("--netns", *netns,
                 "instead of the relay, a packet-level link between network namespaces NAME-a (client, " +
                     std::string(wire::PacketLink::kAddressA) + ") and NAME-b (server, " + wire::PacketLink::kAddressB +
                     "); needs root");
  app.add_option("--loss", *loss, "packet loss each way, with --netns (e.g. 0.01)")->check(CLI::Range(0.0, 0.5));
  return [=] {
    const wire::LinkSpec spec = wire::LinkSpec::parse(*link);
    if (netns->empty() == to->empty())
      throw Error("give either --to (the TCP relay) or --netns (the packet-level link)",
                  "see amaq emulate-link --help");
    if (*loss > 0 && netns->empty())
      throw Error("--loss needs --netns: the relay carries a byte stream, which TCP has already made lossless", "");
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
    int sig = 0;
    if (!netns->empty()) {
      wire::PacketLink packets(*netns, {spec, *loss, 1});
      std::fprintf(stdout, "namespaces %s (%s) and %s (%s) ready\n", packets.netns(wire::PacketLink::End::kA).c_str(),
                   wire::PacketLink::kAddressA, packets.netns(wire::PacketLink::End::kB).c_str(),
                   wire::PacketLink::kAddressB);
      std::fflush(stdout);
      spdlog::info("emulating a {} link with {:.2f}% loss each way at the packet level", spec.to_string(), 100 * *loss);
      sigwait(&sigs, &sig);
      spdlog::info("signal {}: {} packets delivered, {} dropped", sig, packets.delivered(), packets.dropped());
      return 0;
    }
    auto [host, port] = host_port(*to, "--to");
    wire::LinkEmulator emulator(*listen, host, port, spec);
    std::fprintf(stdout, "listening on 127.0.0.1:%u\n", emulator.port());
    std::fflush(stdout);
    spdlog::info("emulating a {} link (one-way delay {} us, queue {} bytes) to {}", spec.to_string(),
                 spec.one_way_delay.count(), spec.queue_limit(), *to);
    sigwait(&sigs, &sig);
    spdlog::info("signal {}: relayed {} bytes to the server and {} back", sig, emulator.bytes_forward(),
                 emulator.bytes_backward());
    return 0;
  };
}

Run add_client(CLI::App& app) {
  app.option_defaults()->always_capture_default();
  auto a = std::make_shared<ClientArgs>();
  add_client_options(app, &a->cfg, &a->codecs);
  // Across a real link the next micro-batches' activations travel while the server computes; 4 was
  // faster than 2 on every emulated link (docs/wan.md).
  add_in_flight_option(app, &a->cfg, 4);
  app.add_option("--connect", a->connect, "server HOST:PORT")->required();
  app.add_option("--tls-ca", a->tls_ca, "CA that signed the server's certificate (turns TLS on)");
  app.add_option("--tls-cert", a->tls_cert, "client certificate for mutual TLS");
  app.add_option("--tls-key", a->tls_key, "client key for mutual TLS");
  app.add_option("--token-file", a->token_file, "file with the token the server was given");
  app.add_option("--federation", a->cfg.federation,
                 "SplitFed: share the server side with this federation's runs and average the client sides");
  app.add_option("--fed-every", a->cfg.fed_every, "average the client side with the federation every N steps")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--fed-clients", a->cfg.fed_clients, "members the federation waits for before its first step")
      ->check(CLI::Range(1, 1024));
  auto config = use_toml_config(app);
  return [a, &app, config] {
    config();
    return run_client(*a, app);
  };
}

Run add_train(CLI::App& app) {
  app.option_defaults()->always_capture_default();
  auto a = std::make_shared<TrainArgs>();
  add_client_options(app, &a->cfg, &a->codecs);
  add_side_options(app, &a->server_side, "server-", "server");
  // Both sides share this process's compute thread: nothing to overlap, so serial by default.
  add_in_flight_option(app, &a->cfg, 1);
  app.add_option("--transport", a->transport,
                 "inproc (one process, in-memory channel) or tcp (loopback TCP with a token)")
      ->check(CLI::IsMember({"inproc", "tcp"}));
  auto config = use_toml_config(app);
  return [a, &app, config] {
    config();
    // Unless told otherwise, the server side trains what the client side trains.
    const auto given = [&](const char* flag) { return app.get_option(flag)->count() > 0; };
    SideOptions& srv = a->server_side;
    const SideOptions& cli = a->cfg.side;
    if (!given("--server-full")) srv.full = cli.full;
    if (!given("--server-lora-r")) srv.lora_r = cli.lora_r;
    if (!given("--server-lora-alpha")) srv.lora_alpha = cli.lora_alpha;
    if (!given("--server-lora-dropout")) srv.lora_dropout = cli.lora_dropout;
    if (!given("--server-rslora")) srv.rslora = cli.rslora;
    if (!given("--server-lora-targets")) srv.targets = cli.targets;
    if (!given("--server-adapter")) srv.init_adapter = cli.init_adapter;
    if (!given("--server-device")) srv.device = cli.device;
    if (!given("--server-dtype")) srv.dtype = cli.dtype;
    if (!given("--server-activation-checkpointing")) srv.activation_checkpointing = cli.activation_checkpointing;
    return run_train(*a, app);
  };
}

Run add_export(CLI::App& app) {
  struct Args {
    std::string run_dir, out, server_run_dir;
    bool merged = false;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--run-dir", a->run_dir, "the client's run directory")->required();
  app.add_option("--out", a->out, "directory to write: a PEFT adapter, or with --merged an HF model")->required();
  app.add_flag("--merged", a->merged, "write the whole model with the run's training merged in (LoRA or full weights)");
  app.add_option("--server-run-dir", a->server_run_dir,
                 "--merged with a full-weights server: the server's --run-dir (default RUN/server)");
  return [a] {
    if (a->merged) {
      train::export_merged(a->run_dir, a->out, a->server_run_dir);
      fmt::print("exported {} -> {} (merged model)\n", a->run_dir, a->out);
    } else {
      train::export_adapter(a->run_dir, a->out);
      fmt::print("exported {} -> {}\n", a->run_dir, a->out);
    }
    return 0;
  };
}

}  // namespace amaq::app
