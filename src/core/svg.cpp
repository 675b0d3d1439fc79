#include "core/svg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace amaq::svg {

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else if (c == '"')
      out += "&quot;";
    else
      out += c;
  }
  return out;
}

namespace {

std::string tick_text(double v, double step) {
  const int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
  return fmt::format("{:.{}f}", std::abs(v) < step * 1e-9 ? 0.0 : v, decimals);
}

// The document's start: white background, the title at the plot area's left edge.
std::string open_svg(int width, int height, double left, const std::string& title) {
  return fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{3}</text>\n",
      width, height, left, escape(title));
}

// The plot area's frame and the axis titles under and left of it.
std::string frame_and_labels(double left, double top, double right, double bottom, int height,
                             const std::string& x_label, const std::string& y_label) {
  std::string o = fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n",
                              left, top, right - left, bottom - top);
  o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (left + right) / 2, height - 10,
                   escape(x_label));
  o += fmt::format("<text transform=\"translate(16 {:.1f}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                   (top + bottom) / 2, escape(y_label));
  return o;
}

}  // namespace

Axis nice_axis(double min, double max, int target) {
  if (!std::isfinite(min) || !std::isfinite(max)) min = 0, max = 1;
  if (max < min) std::swap(min, max);
  if (max - min < 1e-12 * std::max(1.0, std::abs(max))) {
    const double pad = std::max(0.5, std::abs(max) * 0.1);
    min -= pad, max += pad;
  }
  const double raw = (max - min) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  Axis a;
  a.lo = std::floor(min / step + 1e-9) * step;
  a.hi = std::ceil(max / step - 1e-9) * step;
  for (double v = a.lo; v <= a.hi + step * 1e-6; v += step) a.ticks.push_back(v);
  return a;
}

std::string palette(size_t i) {
  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return kColors[i % 10];
}

std::string plot(const PlotOptions& opt, const std::vector<Series>& series) {
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const Series& s : series) {
    for (auto [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  }
  const Axis ax = nice_axis(x0, x1), ay = nice_axis(y0, y1);
  const double left = 64, top = 34, right = opt.width - 210.0, bottom = opt.height - 48.0;
  auto px = [&](double x) { return left + (x - ax.lo) / (ax.hi - ax.lo) * (right - left); };
  auto py = [&](double y) { return bottom - (y - ay.lo) / (ay.hi - ay.lo) * (bottom - top); };
  std::string o = open_svg(opt.width, opt.height, left, opt.title);
  const double xstep = ax.ticks.size() > 1 ? ax.ticks[1] - ax.ticks[0] : 1,
               ystep = ay.ticks.size() > 1 ? ay.ticks[1] - ay.ticks[0] : 1;
  for (double t : ax.ticks) {
    o += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#e5e5e5\"/>\n", px(t), top,
                     bottom);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(t), bottom + 16,
                     tick_text(t, xstep));
  }
  for (double t : ay.ticks) {
    o += fmt::format("<line x1=\"{1}\" y1=\"{0:.1f}\" x2=\"{2}\" y2=\"{0:.1f}\" stroke=\"#e5e5e5\"/>\n", py(t), left,
                     right);
    o += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6, py(t) + 4,
                     tick_text(t, ystep));
  }
  o += frame_and_labels(left, top, right, bottom, opt.height, opt.x_label, opt.y_label);
  for (size_t i = 0; i < series.size(); ++i) {
    const Series& s = series[i];
    // The values themselves ride along (round-trip precision), so a reader or a test can take the
    // series back out of the picture.
    std::string values;
    for (auto [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) values += fmt::format("{},{} ", x, y);  // shortest round-trip form
    if (!values.empty()) values.pop_back();
    o += fmt::format("<g class=\"series\" data-label=\"{}\" data-values=\"{}\">\n", escape(s.label), values);
    std::string pts;
    for (auto [x, y] : s.points) {
      if (std::isfinite(x) && std::isfinite(y)) pts += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
    }
    if (s.line && !pts.empty()) {
      pts.pop_back();
      o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{} points=\"{}\"/>\n", s.color,
                       s.dashed ? " stroke-dasharray=\"5,3\"" : "", pts);
    }
    if (s.markers) {
      for (auto [x, y] : s.points) {
        if (std::isfinite(x) && std::isfinite(y))
          o += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", px(x), py(y), s.color);
      }
    }
    o += "</g>\n";
    const double ly = top + 8 + 16.0 * static_cast<double>(i);
    o += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\"{}/>\n",
                     right + 12, ly, right + 32, ly, s.color, s.dashed ? " stroke-dasharray=\"5,3\"" : "");
    o += fmt::format("<text x=\"{}\" y=\"{:.1f}\">{}</text>\n", right + 38, ly + 4, escape(s.label));
  }
  return o + "</svg>\n";
}

std::vector<std::pair<double, double>> series_values(const std::string& svg, const std::string& label) {
  const std::string key = "data-label=\"" + escape(label) + "\" data-values=\"";
  const size_t at = svg.find(key);
  if (at == std::string::npos) return {};
  const size_t begin = at + key.size(), end = svg.find('"', begin);
  std::vector<std::pair<double, double>> out;
  std::string text = svg.substr(begin, end - begin);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = text.find(' ', pos);
    if (next == std::string::npos) next = text.size();
    const std::string pair = text.substr(pos, next - pos);
    const size_t comma = pair.find(',');
    if (comma != std::string::npos)
      out.emplace_back(std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1)));
    pos = next + 1;
  }
  return out;
}

std::string heatmap(const HeatmapOptions& opt, const std::vector<std::vector<double>>& cells) {
  const size_t rows = cells.size(), cols = rows ? cells[0].size() : 0;
  const double left = 64, top = 34, right = opt.width - 110.0, bottom = opt.height - 48.0;
  std::string o = open_svg(opt.width, opt.height, left, opt.title);
  // Colour: light (vmin) to dark blue (vmax).
  auto colour = [&](double v) {
    const double t = opt.vmax > opt.vmin ? std::clamp((v - opt.vmin) / (opt.vmax - opt.vmin), 0.0, 1.0) : 0.5;
    const int r = static_cast<int>(std::lround(247 - t * (247 - 8))),
              g = static_cast<int>(std::lround(251 - t * (251 - 48))),
              b = static_cast<int>(std::lround(255 - t * (255 - 107)));
    return fmt::format("#{:02x}{:02x}{:02x}", r, g, b);
  };
  const double cw = cols ? (right - left) / static_cast<double>(cols) : 0,
               ch = rows ? (bottom - top) / static_cast<double>(rows) : 0;
  o += "<g class=\"cells\" shape-rendering=\"crispEdges\">\n";
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) {
      o += fmt::format(
          "<rect x=\"{:.2f}\" y=\"{:.2f}\" width=\"{:.2f}\" height=\"{:.2f}\" fill=\"{}\" data-v=\"{}\"/>\n",
          left + cw * static_cast<double>(c), top + ch * static_cast<double>(r), cw + 0.05, ch + 0.05,
          colour(cells[r][c]), cells[r][c]);
    }
  }
  o += "</g>\n";
  o += frame_and_labels(left, top, right, bottom, opt.height, opt.x_label, opt.y_label);
  o +=
      fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", left - 6, top + 10, escape(opt.top_label));
  o += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6, bottom,
                   escape(opt.bottom_label));
  // Legend: the colour scale.
  for (int i = 0; i <= 4; ++i) {
    const double v = opt.vmin + (opt.vmax - opt.vmin) * i / 4.0, y = top + 20.0 * i;
    o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"14\" fill=\"{}\" stroke=\"#999\"/>\n", right + 16,
                     y, colour(v));
    o += fmt::format("<text x=\"{}\" y=\"{}\">{} {}</text>\n", right + 36, y + 11, fmt::format("{:.1f}", v),
                     escape(opt.unit));
  }
  return o + "</svg>\n";
}

}  // namespace amaq::svg
