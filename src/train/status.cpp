#include "train/status.h"

#include <fmt/format.h>

#include <algorithm>
#include <sstream>

#include "core/runtime.h"
#include "core/svg.h"

namespace amaq::train {
namespace {

// A label value in the exposition format: backslash, double quote and newline escaped.
std::string label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

double bits(uint64_t packet_bytes, uint64_t elements) {
  return elements ? 8.0 * static_cast<double>(packet_bytes) / static_cast<double>(elements) : 0.0;
}

class Exposition {
 public:
  void family(const char* name, const char* type, const char* help) {
    out_ << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  }
  void sample(const std::string& name, double v, const std::string& labels = "") {
    out_ << name;
    if (!labels.empty()) out_ << '{' << labels << '}';
    out_ << ' ' << fmt::format("{}", v) << '\n';
  }
  std::string str() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

}  // namespace

StatusSnapshot status_snapshot(TrainServer& srv, const wire::Server& server) {
  return {srv.status(),
          server.refusals(),
          server.sessions_started(),
          server.sessions_failed(),
          server.live_sessions(),
          static_cast<uint64_t>(std::max<int64_t>(0, proc_status_value("VmRSS"))) * 1024};
}

std::string prometheus_text(const StatusSnapshot& s) {
  Exposition e;
  e.family("amaq_sessions_live", "gauge", "Authenticated sessions open now.");
  e.sample("amaq_sessions_live", static_cast<double>(s.sessions_live));
  e.family("amaq_connections_total", "counter", "Connections accepted.");
  e.sample("amaq_connections_total", static_cast<double>(s.sessions_started));
  e.family("amaq_connections_refused_total", "counter", "Connections ended before a session, by cause.");
  for (const auto& [cause, n] : s.refusals)
    e.sample("amaq_connections_refused_total", static_cast<double>(n), "cause=\"" + label(cause) + "\"");
  const TrainServer::Admissions& a = s.train.admissions;
  e.family("amaq_runs_live", "gauge", "Runs training now.");
  e.sample("amaq_runs_live", static_cast<double>(a.live));
  e.family("amaq_runs_peak", "gauge", "Most runs training at once since the server started.");
  e.sample("amaq_runs_peak", static_cast<double>(a.peak));
  e.family("amaq_runs_refused_total", "counter", "Runs told the server is busy, or refused as over its budget.");
  e.sample("amaq_runs_refused_total", static_cast<double>(a.busy), "cause=\"busy\"");
  e.sample("amaq_runs_refused_total", static_cast<double>(a.over_budget), "cause=\"over budget\"");
  e.family("amaq_steps_served_total", "counter", "Optimizer steps served, all runs.");
  e.sample("amaq_steps_served_total", static_cast<double>(s.train.steps_served));
  e.family("amaq_memory_bytes", "gauge",
           "Resident memory of the process, the frozen weights all runs share, and what live runs own (estimated).");
  e.sample("amaq_memory_bytes", static_cast<double>(s.resident_bytes), "kind=\"resident\"");
  e.sample("amaq_memory_bytes", static_cast<double>(s.train.shared_base_bytes), "kind=\"shared weights\"");
  e.sample("amaq_memory_bytes", static_cast<double>(a.live_bytes), "kind=\"runs\"");

  e.family("amaq_run_step", "gauge", "Optimizer steps a live run has completed.");
  for (const auto& r : s.train.runs)
    e.sample("amaq_run_step", static_cast<double>(r.step), "run=\"" + label(r.run_id) + "\"");
  e.family("amaq_run_bytes_total", "counter", "Frame bytes of a live run's session, by direction.");
  for (const auto& r : s.train.runs) {
    e.sample("amaq_run_bytes_total", static_cast<double>(r.bytes_in),
             "run=\"" + label(r.run_id) + "\",direction=\"in\"");
    e.sample("amaq_run_bytes_total", static_cast<double>(r.bytes_out),
             "run=\"" + label(r.run_id) + "\",direction=\"out\"");
  }
  e.family("amaq_run_effective_bits", "gauge",
           "Packet bits per activation (forward) or gradient (backward) element, a live run so far.");
  for (const auto& r : s.train.runs) {
    e.sample("amaq_run_effective_bits", bits(r.fwd_packet_bytes, r.elements),
             "run=\"" + label(r.run_id) + "\",direction=\"forward\"");
    e.sample("amaq_run_effective_bits", bits(r.bwd_packet_bytes, r.elements),
             "run=\"" + label(r.run_id) + "\",direction=\"backward\"");
  }
  e.family(
      "amaq_run_microbatch_seconds", "summary",
      "A live run's server time per micro-batch (waiting for the compute thread included): fairness between runs.");
  for (const auto& r : s.train.runs) {
    e.sample("amaq_run_microbatch_seconds_sum", r.seconds_sum, "run=\"" + label(r.run_id) + "\"");
    e.sample("amaq_run_microbatch_seconds_count", static_cast<double>(r.micro_batches),
             "run=\"" + label(r.run_id) + "\"");
  }
  e.family("amaq_run_microbatch_seconds_max", "gauge", "A live run's longest server time for one micro-batch.");
  for (const auto& r : s.train.runs)
    e.sample("amaq_run_microbatch_seconds_max", r.seconds_max, "run=\"" + label(r.run_id) + "\"");
  const TrainServer::Latency& l = s.train.latency;
  e.family("amaq_microbatch_seconds", "histogram",
           "Server time of a micro-batch, FORWARD received to BACKWARD ready (waiting for compute included).");
  for (size_t i = 0; i < std::size(TrainServer::Latency::kBounds); ++i) {
    e.sample("amaq_microbatch_seconds_bucket", static_cast<double>(l.counts[i]),
             fmt::format("le=\"{}\"", TrainServer::Latency::kBounds[i]));
  }
  e.sample("amaq_microbatch_seconds_bucket", static_cast<double>(l.count), "le=\"+Inf\"");
  e.sample("amaq_microbatch_seconds_sum", l.sum);
  e.sample("amaq_microbatch_seconds_count", static_cast<double>(l.count));
  return e.str();
}

std::string status_html(const StatusSnapshot& s) {
  std::string out =
      "<!doctype html><html><head><meta charset=\"utf-8\"><title>amaq server</title>"
      "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:right}"
      "td:first-child,th:first-child{text-align:left}</style></head><body><h1>amaq server</h1>";
  const TrainServer::Admissions& a = s.train.admissions;
  out += fmt::format(
      "<p>{} runs training (at most {} at once so far), {} sessions open, {} steps served; {} runs told the "
      "server is busy, {} over its budget. Memory: {:.0f} MB resident, {:.0f} MB of shared weights, {:.0f} MB "
      "owned by runs. <a href=\"/metrics\">metrics</a></p>",
      a.live, a.peak, s.sessions_live, s.train.steps_served, a.busy, a.over_budget,
      static_cast<double>(s.resident_bytes) / 1e6, static_cast<double>(s.train.shared_base_bytes) / 1e6,
      static_cast<double>(a.live_bytes) / 1e6);
  out +=
      "<table><tr><th>run</th><th>federation</th><th>session</th><th>step</th><th>codecs (fwd / bwd)</th><th>MB in</th>"
      "<th>MB out</th><th>bits fwd</th><th>bits bwd</th><th>ms per micro-batch (mean / max)</th></tr>";
  for (const auto& r : s.train.runs) {
    out += fmt::format(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{} / {}</td><td>{:.2f}</td><td>{:.2f}</td>"
        "<td>{:.2f}</td><td>{:.2f}</td><td>{:.1f} / {:.1f}</td></tr>",
        svg::escape(r.run_id), r.federation.empty() ? "-" : svg::escape(r.federation), r.session, r.step, r.steps,
        svg::escape(r.fwd_codec), svg::escape(r.bwd_codec), static_cast<double>(r.bytes_in) / 1e6,
        static_cast<double>(r.bytes_out) / 1e6, bits(r.fwd_packet_bytes, r.elements),
        bits(r.bwd_packet_bytes, r.elements),
        r.micro_batches ? 1e3 * r.seconds_sum / static_cast<double>(r.micro_batches) : 0.0, 1e3 * r.seconds_max);
  }
  out += "</table></body></html>\n";
  return out;
}

wire::HttpResponse status_response(const std::string& path, const StatusSnapshot& s) {
  if (path == "/metrics") return {200, "text/plain; version=0.0.4; charset=utf-8", prometheus_text(s)};
  if (path == "/") return {200, "text/html; charset=utf-8", status_html(s)};
  return {404, "text/plain; charset=utf-8", "no page " + path.substr(0, 100) + " (try / or /metrics)\n"};
}

}  // namespace amaq::train
