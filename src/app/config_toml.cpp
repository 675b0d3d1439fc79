#include "app/config_toml.h"

#if AMAQ_HAVE_TOML
#include <toml++/toml.h>
#endif

#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace amaq::app {
namespace {

struct Item {
  std::string key;
  std::vector<std::string> values;
};

#if AMAQ_HAVE_TOML
std::string scalar_text(const toml::node& n, const std::string& key, const std::string& path) {
  if (n.is_string()) return *n.value<std::string>();
  if (n.is_boolean()) return *n.value<bool>() ? "true" : "false";
  if (n.is_integer()) return std::to_string(*n.value<int64_t>());
  if (n.is_floating_point()) {
    std::ostringstream o;
    o.precision(17);
    o << *n.value<double>();
    return o.str();
  }
  throw Error(path + ": key '" + key + "' has a value of an unsupported type",
              "use strings, numbers, booleans or arrays of them");
}

void flatten(const toml::table& t, const std::string& prefix, const std::string& path, std::vector<Item>* out) {
  for (const auto& [k, node] : t) {
    std::string key = prefix.empty() ? std::string(k.str()) : prefix + "-" + std::string(k.str());
    for (char& ch : key) ch = ch == '_' ? '-' : ch;
    if (const toml::table* sub = node.as_table()) {
      flatten(*sub, key, path, out);
      continue;
    }
    Item item{key, {}};
    if (const toml::array* arr = node.as_array()) {
      for (const auto& el : *arr) item.values.push_back(scalar_text(el, key, path));
    } else {
      item.values.push_back(scalar_text(node, key, path));
    }
    out->push_back(std::move(item));
  }
}
#endif

#if AMAQ_HAVE_TOML
toml::table parse_toml(const std::string& path, const char* hint) {
  try {
    return toml::parse(read_file(path), path);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << path << " is not valid TOML: " << e.description() << " (line " << e.source().begin.line << ", column "
        << e.source().begin.column << ")";
    throw Error(msg.str(), hint);
  }
}
#endif

#if !AMAQ_HAVE_TOML
[[noreturn]] void no_toml(const std::string& path, const char* hint) {
  throw Error("this build has no TOML support (toml++ was not found when it was configured): cannot read " + path,
              hint);
}
#endif

std::vector<Item> read_items(const std::string& path) {
#if !AMAQ_HAVE_TOML
  no_toml(path, "pass the options as flags, or install libtomlplusplus-dev and rebuild");
#else
  const toml::table t =
      parse_toml(path, "see https://toml.io; keys are flag names, e.g. steps = 100, fwd-codec = \"amaq:budget=4\"");
  std::vector<Item> items;
  flatten(t, "", path, &items);
  return items;
#endif
}

}  // namespace

std::function<void()> use_toml_config(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  std::vector<CLI::Option*> required;
  for (CLI::Option* opt : app.get_options()) {
    if (opt->get_required()) {
      opt->required(false);
      required.push_back(opt);
    }
  }
  app.add_option("--config", *path, "TOML file of options (keys = flag names; flags on the command line win)");
  return [path, required, &app] {
    if (!path->empty()) {
      for (const Item& item : read_items(*path)) {
        CLI::Option* opt = app.get_option_no_throw("--" + item.key);
        if (!opt || item.key == "config") {
          throw Error(*path + ": unknown option '" + item.key + "'",
                      "keys are the long flag names of `amaq " + app.get_name() + " --help`");
        }
        if (opt->count() > 0) continue;  // given on the command line
        try {
          for (const auto& v : item.values) opt->add_result(v);
          opt->run_callback();
        } catch (const CLI::Error& e) {
          throw Error(*path + ": option '" + item.key + "': " + e.what(), "check the value's type and range");
        }
      }
    }
    for (CLI::Option* opt : required) {
      if (opt->count() == 0) {
        throw Error(opt->get_name() + " is required",
                    "give it as a flag or as '" + opt->get_lnames().front() + "' in --config");
      }
    }
  };
}

nlohmann::json read_toml_json(const std::string& path) {
#if !AMAQ_HAVE_TOML
  no_toml(path, "install libtomlplusplus-dev and rebuild");
#else
  const toml::table t = parse_toml(path, "see https://toml.io and plans/small.toml");
  std::ostringstream json;
  json << toml::json_formatter{t};
  return nlohmann::json::parse(json.str());
#endif
}

std::vector<std::pair<std::string, std::string>> resolved_options(const CLI::App& app) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const CLI::Option* opt : app.get_options()) {
    if (opt->get_lnames().empty()) continue;
    const std::string key = opt->get_lnames().front();
    if (key == "help" || key == "config") continue;
    std::string value;
    if (opt->count() > 0) {
      for (const auto& r : opt->results()) value += (value.empty() ? "" : ",") + r;
    } else {
      value = opt->get_default_str();
      if (value.empty() && opt->get_expected_max() == 0) value = "false";  // a flag not given
    }
    out.emplace_back(key, value);
  }
  return out;
}

}  // namespace amaq::app
