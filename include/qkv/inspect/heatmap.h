// qkv/inspect/heatmap.h: pictures of attention weights (`qkv heatmap`):
// one map per head, query rows top to bottom, keys left to right, laid out
// in a grid, with a colour scale from weight 0 to weight 1.
//
// Formats: PNG (libpng; pixels only: cells, grid, colour bar, and the token
// labels in a tEXt chunk), SVG (text: cells as rects with the weight in a
// <title>, token labels on both axes, the colour bar with its ends
// labelled), and the terminal (Unicode upper half blocks, two query rows
// per line, xterm 256-colour escapes).
#ifndef QKV_INSPECT_HEATMAP_H_
#define QKV_INSPECT_HEATMAP_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace qkv::inspect {

// The maps to draw: weights[h] is a [rows, cols] row-major map in [0, 1].
struct Heatmap {
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> heads;               // the head number of each map
  std::vector<std::vector<float>> weights;  // one [rows, cols] map per head
  std::vector<std::string> row_labels, col_labels;  // tokens; empty: indices
};

// The colour of weight w (clamped to [0, 1]): a perceptual sequential scale
// from dark blue-violet (0) through teal to yellow (1), linear in w between
// five anchors (matplotlib's viridis at 0, .25, .5, .75, 1).
std::array<uint8_t, 3> WeightColour(float w);

// Layout of the PNG, in pixels (tests decode against it).
struct PngLayout {
  int64_t cell = 0, gap = 0, grid_cols = 0, grid_rows = 0, width = 0, height = 0;
  int64_t bar_top = 0, bar_height = 0;  // the colour bar, under the grid
};
PngLayout LayoutPng(const Heatmap& map);

// Encodes the maps as PNG bytes (8-bit RGB). Throws qkv::Error on failure.
std::vector<unsigned char> RenderPng(const Heatmap& map);
// Returns the maps as an SVG document.
std::string RenderSvg(const Heatmap& map);
// Returns the maps for a 256-colour terminal.
std::string RenderTerminal(const Heatmap& map);

}  // namespace qkv::inspect

#endif  // QKV_INSPECT_HEATMAP_H_
