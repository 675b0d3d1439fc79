// `amaq report RUN_DIR... [--out report.html]`: a run's metrics as one self-contained HTML page
// (train/report.h); several runs are overlaid. Works while a run is going.
#include <fmt/format.h>

#include "app/commands.h"
#include "core/fs.h"
#include "train/report.h"

namespace amaq::app {

Run add_report(CLI::App& app) {
  struct Args {
    std::vector<std::string> dirs;
    std::string out;
  };
  auto a = std::make_shared<Args>();
  app.add_option("runs", a->dirs, "run directories (of amaq train / amaq client)")->required();
  app.add_option("--out", a->out, "the page to write (default: RUN/report.html for one run, report.html for several)");
  return [a] {
    const std::string out = !a->out.empty()       ? a->out
                            : a->dirs.size() == 1 ? join_path(a->dirs[0], "report.html")
                                                  : "report.html";
    train::write_report(a->dirs, out);
    fmt::print("report: {} ({} run{})\n", out, a->dirs.size(), a->dirs.size() == 1 ? "" : "s");
    return 0;
  };
}

}  // namespace amaq::app
