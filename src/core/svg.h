// Plain SVG line and scatter plots and heatmaps for the study's report (docs/results.md embeds them)
// and a run's report page: no plotting library on the machine, and these need nothing but axes,
// series and a legend.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace amaq::svg {

/// An axis range widened to "nice" tick values (1, 2 or 5 times a power of ten).
struct Axis {
  double lo = 0, hi = 1;
  std::vector<double> ticks;
};
/// Ticks covering [min, max] with about `target` intervals; a flat range is widened around it.
Axis nice_axis(double min, double max, int target = 5);

struct Series {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  ///< (x, y); non-finite points are skipped
  bool line = true;                               ///< joined by a polyline
  bool markers = false;                           ///< a circle at each point
  bool dashed = false;
};

struct PlotOptions {
  std::string title, x_label, y_label;
  int width = 760, height = 420;
};

/// A complete SVG document: axes with ticks and grid, the series, a legend on the right.
std::string plot(const PlotOptions& opt, const std::vector<Series>& series);

/// The (finite) values of the first series labelled `label` in an SVG from plot() (each series
/// carries them in a data-values attribute), or none when there is no such series.
std::vector<std::pair<double, double>> series_values(const std::string& svg, const std::string& label);

struct HeatmapOptions {
  std::string title, x_label, y_label, top_label, bottom_label, unit;
  double vmin = 0, vmax = 1;
  int width = 760, height = 420;
};

/// A grid of coloured cells, cells[row][col] (row 0 at the top), with a colour scale from vmin to vmax;
/// each cell carries its value in data-v.
std::string heatmap(const HeatmapOptions& opt, const std::vector<std::vector<double>>& cells);

/// Text escaped for XML and HTML (& < > ").
std::string escape(const std::string& s);

/// A colour per index from a fixed palette, distinct for the first ten.
std::string palette(size_t i);

}  // namespace amaq::svg
