#include "app/config_toml.h"

#if AMAQ_HAVE_TOML
#include <toml++/toml.h>
#endif

#include <nlohmann/json.hpp>

#include <sstream>

#include "core/error.h"

namespace amaq::app {
#if AMAQ_HAVE_TOML
namespace {

std::string scalar_text(const toml::node& n, const std::string& key) {
  if (auto s = n.value<std::string>(); s && n.is_string()) return *s;
  if (n.is_boolean()) return *n.value<bool>() ? "true" : "false";
  if (n.is_integer()) return std::to_string(*n.value<int64_t>());
  if (n.is_floating_point()) {
    std::ostringstream o;
    o.precision(17);
    o << *n.value<double>();
    return o.str();
  }
  throw Error("config key '" + key + "' has a value of an unsupported type", "use strings, numbers, booleans or arrays of them");
}

void flatten(const toml::table& t, const std::string& prefix, std::vector<CLI::ConfigItem>* out) {
  for (const auto& [k, node] : t) {
    std::string key = prefix.empty() ? std::string(k.str()) : prefix + "-" + std::string(k.str());
    for (char& ch : key) ch = ch == '_' ? '-' : ch;
    if (const toml::table* sub = node.as_table()) {
      flatten(*sub, key, out);
      continue;
    }
    CLI::ConfigItem item;
    item.name = key;
    if (const toml::array* arr = node.as_array()) {
      for (const auto& el : *arr) item.inputs.push_back(scalar_text(el, key));
    } else {
      item.inputs.push_back(scalar_text(node, key));
    }
    out->push_back(std::move(item));
  }
}

}  // namespace

#endif

std::string TomlConfig::to_config(const CLI::App* app, bool, bool, std::string) const {
  std::string out;
  for (const auto& [k, v] : resolved_options(*app)) out += k + " = " + nlohmann::json(v).dump() + "\n";
  return out;
}

std::vector<CLI::ConfigItem> TomlConfig::from_config(std::istream& input) const {
#if !AMAQ_HAVE_TOML
  throw CLI::ConversionError("this build has no TOML support (toml++ was not found at configure time); pass options as flags");
#else
  std::ostringstream ss;
  ss << input.rdbuf();
  toml::table t;
  try {
    t = toml::parse(ss.str());
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << "config file is not valid TOML: " << e.description() << " (line " << e.source().begin.line << ", column "
        << e.source().begin.column << ")";
    throw CLI::ConversionError(msg.str());
  }
  std::vector<CLI::ConfigItem> items;
  flatten(t, "", &items);
  return items;
#endif
}

void use_toml_config(CLI::App& app) {
  app.config_formatter(std::make_shared<TomlConfig>());
  app.set_config("--config", "", "TOML file of options (keys = flag names; flags on the command line win)");
  app.allow_config_extras(CLI::config_extras_mode::error);
  app.option_defaults()->always_capture_default();
}

std::vector<std::pair<std::string, std::string>> resolved_options(const CLI::App& app) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const CLI::Option* opt : app.get_options()) {
    const std::string name = opt->get_name(false, true);
    if (name.empty() || opt->get_lnames().empty()) continue;
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
