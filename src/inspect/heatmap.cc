// Heatmaps of attention weights (qkv/inspect/heatmap.h).
//
// Everything is drawn from one layout: maps of rows x cols cells of
// `cell` pixels, `gap` pixels apart, ceil(sqrt(heads)) maps per grid row;
// the colour bar spans the grid's width under it. PNG goes through libpng's
// simplified write API (png_image_write_to_memory).
#include "qkv/inspect/heatmap.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "inspect/markup.h"
#include "qkv/error.h"

namespace qkv::inspect {
namespace {

// matplotlib's viridis at 0, 0.25, 0.5, 0.75 and 1.
constexpr std::array<std::array<double, 3>, 5> kAnchors = {
    {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}}};


std::string Label(const std::vector<std::string>& labels, int64_t i) {
  return labels.empty() ? std::to_string(i) : labels[static_cast<size_t>(i)];
}

// A label for the terminal: control bytes (an escape sequence in a token)
// become '?'.
std::string TerminalSafe(const std::string& text) {
  std::string out = text;
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return out;
}

// xterm 256-colour index nearest to an RGB colour (its 6x6x6 cube).
int Xterm256(const std::array<uint8_t, 3>& c) {
  auto level = [](uint8_t v) { return v < 48 ? 0 : v < 115 ? 1 : (v - 35) / 40; };
  return 16 + 36 * level(c[0]) + 6 * level(c[1]) + level(c[2]);
}

}  // namespace

std::array<uint8_t, 3> WeightColour(float w) {
  const double x = std::clamp(std::isnan(w) ? 0.0 : static_cast<double>(w), 0.0, 1.0) * 4.0;
  const int i = std::min(3, static_cast<int>(x));
  const double t = x - i;
  std::array<uint8_t, 3> c{};
  for (int k = 0; k < 3; ++k) {
    c[k] = static_cast<uint8_t>(
        std::lround(kAnchors[i][k] + t * (kAnchors[i + 1][k] - kAnchors[i][k])));
  }
  return c;
}

PngLayout LayoutPng(const Heatmap& m) {
  PngLayout l;
  const int64_t n = static_cast<int64_t>(m.weights.size()), side = std::max(m.rows, m.cols);
  l.cell = std::clamp<int64_t>(256 / std::max<int64_t>(side, 1), 2, 24);
  l.gap = 8;
  l.grid_cols =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n)))));
  l.grid_rows = (n + l.grid_cols - 1) / l.grid_cols;
  l.width = l.gap + l.grid_cols * (m.cols * l.cell + l.gap);
  l.bar_height = 12;
  l.bar_top = l.gap + l.grid_rows * (m.rows * l.cell + l.gap);
  l.height = l.bar_top + l.bar_height + l.gap;
  return l;
}

std::vector<unsigned char> RenderPng(const Heatmap& m) {
  const PngLayout l = LayoutPng(m);
  std::vector<unsigned char> rgb(static_cast<size_t>(l.width * l.height * 3), 255);
  auto put = [&](int64_t x, int64_t y, const std::array<uint8_t, 3>& c) {
    std::copy(c.begin(), c.end(), rgb.begin() + (y * l.width + x) * 3);
  };
  for (size_t h = 0; h < m.weights.size(); ++h) {
    const int64_t x0 = l.gap + static_cast<int64_t>(h) % l.grid_cols * (m.cols * l.cell + l.gap);
    const int64_t y0 = l.gap + static_cast<int64_t>(h) / l.grid_cols * (m.rows * l.cell + l.gap);
    for (int64_t i = 0; i < m.rows; ++i)
      for (int64_t j = 0; j < m.cols; ++j) {
        const auto c = WeightColour(m.weights[h][static_cast<size_t>(i * m.cols + j)]);
        for (int64_t y = 0; y < l.cell; ++y)
          for (int64_t x = 0; x < l.cell; ++x) put(x0 + j * l.cell + x, y0 + i * l.cell + y, c);
      }
  }
  const int64_t bar_width = l.width - 2 * l.gap;
  for (int64_t x = 0; x < bar_width; ++x) {
    const auto c = WeightColour(bar_width > 1 ? static_cast<float>(x) / (bar_width - 1) : 0.0f);
    for (int64_t y = 0; y < l.bar_height; ++y) put(l.gap + x, l.bar_top + y, c);
  }
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(l.width);
  image.height = static_cast<png_uint_32>(l.height);
  image.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  if (!png_image_write_to_memory(&image, nullptr, &size, 0, rgb.data(), 0, nullptr)) {
    throw Error(std::string("PNG encoding failed: ") + image.message);
  }
  std::vector<unsigned char> png(size);
  if (!png_image_write_to_memory(&image, png.data(), &size, 0, rgb.data(), 0, nullptr)) {
    throw Error(std::string("PNG encoding failed: ") + image.message);
  }
  png.resize(size);
  return png;
}

std::string RenderSvg(const Heatmap& m) {
  const int64_t cell =
      std::clamp<int64_t>(480 / std::max<int64_t>(std::max(m.rows, m.cols), 1), 6, 28);
  const int64_t label = 90, gap = 30, title = 18;
  const int64_t n = static_cast<int64_t>(m.weights.size());
  const int64_t grid_cols =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n)))));
  const int64_t grid_rows = (n + grid_cols - 1) / grid_cols;
  const int64_t map_w = label + m.cols * cell + gap, map_h = title + label + m.rows * cell + gap;
  const int64_t width = grid_cols * map_w + gap, height = grid_rows * map_h + 60;
  const int64_t font = std::clamp<int64_t>(cell - 2, 6, 12);
  std::string s;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%lld\" height=\"%lld\" "
                "font-family=\"sans-serif\" font-size=\"%lld\">\n",
                static_cast<long long>(width), static_cast<long long>(height),
                static_cast<long long>(font));
  s += buf;
  for (int64_t h = 0; h < n; ++h) {
    const int64_t ox = gap + h % grid_cols * map_w, oy = h / grid_cols * map_h;
    const int64_t x0 = ox + label, y0 = oy + title + label;
    std::snprintf(buf, sizeof buf,
                  "<g class=\"head\" data-head=\"%lld\">\n<text x=\"%lld\" y=\"%lld\" "
                  "font-size=\"13\">head %lld</text>\n",
                  static_cast<long long>(m.heads[h]), static_cast<long long>(x0),
                  static_cast<long long>(oy + 14), static_cast<long long>(m.heads[h]));
    s += buf;
    for (int64_t j = 0; j < m.cols; ++j) {  // key labels, rotated, above the map
      const double x = static_cast<double>(x0 + j * cell) + cell * 0.7;
      std::snprintf(buf, sizeof buf,
                    "<text transform=\"translate(%.1f,%lld) rotate(-60)\">%s</text>\n", x,
                    static_cast<long long>(y0 - 4),
                    internal::EscapeMarkup(Label(m.col_labels, j)).c_str());
      s += buf;
    }
    for (int64_t i = 0; i < m.rows; ++i) {
      std::snprintf(buf, sizeof buf, "<text x=\"%lld\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                    static_cast<long long>(x0 - 4), static_cast<double>(y0 + i * cell) + cell * 0.8,
                    internal::EscapeMarkup(Label(m.row_labels, i)).c_str());
      s += buf;
      for (int64_t j = 0; j < m.cols; ++j) {
        const float w = m.weights[h][static_cast<size_t>(i * m.cols + j)];
        const auto c = WeightColour(w);
        std::snprintf(buf, sizeof buf,
                      "<rect class=\"cell\" x=\"%lld\" y=\"%lld\" width=\"%lld\" height=\"%lld\" "
                      "fill=\"#%02x%02x%02x\"><title>%.4f</title></rect>\n",
                      static_cast<long long>(x0 + j * cell), static_cast<long long>(y0 + i * cell),
                      static_cast<long long>(cell), static_cast<long long>(cell), c[0], c[1], c[2],
                      w);
        s += buf;
      }
    }
    s += "</g>\n";
  }
  // Colour bar: 0 at the left, 1 at the right.
  const int64_t bar_y = grid_rows * map_h + 10, bar_w = std::min<int64_t>(width - 2 * gap, 400);
  s += "<defs><linearGradient id=\"scale\">";
  for (int k = 0; k <= 4; ++k) {
    const auto c = WeightColour(k / 4.0f);
    std::snprintf(buf, sizeof buf, "<stop offset=\"%d%%\" stop-color=\"#%02x%02x%02x\"/>", k * 25,
                  c[0], c[1], c[2]);
    s += buf;
  }
  std::snprintf(buf, sizeof buf,
                "</linearGradient></defs>\n<rect class=\"colour-bar\" x=\"%lld\" y=\"%lld\" "
                "width=\"%lld\" height=\"14\" fill=\"url(#scale)\"/>\n"
                "<text x=\"%lld\" y=\"%lld\">0</text>\n<text x=\"%lld\" y=\"%lld\" "
                "text-anchor=\"end\">1</text>\n</svg>\n",
                static_cast<long long>(gap), static_cast<long long>(bar_y),
                static_cast<long long>(bar_w), static_cast<long long>(gap),
                static_cast<long long>(bar_y + 30), static_cast<long long>(gap + bar_w),
                static_cast<long long>(bar_y + 30));
  s += buf;
  return s;
}

std::string RenderTerminal(const Heatmap& m) {
  std::string s;
  char buf[64];
  for (size_t h = 0; h < m.weights.size(); ++h) {
    s += "head " + std::to_string(m.heads[h]) + " (rows: queries, columns: keys)\n";
    for (int64_t i = 0; i < m.rows; i += 2) {
      for (int64_t j = 0; j < m.cols; ++j) {
        const int top = Xterm256(WeightColour(m.weights[h][static_cast<size_t>(i * m.cols + j)]));
        if (i + 1 < m.rows) {
          const int bottom =
              Xterm256(WeightColour(m.weights[h][static_cast<size_t>((i + 1) * m.cols + j)]));
          std::snprintf(buf, sizeof buf, "\x1b[38;5;%dm\x1b[48;5;%dm\xe2\x96\x80", top, bottom);
        } else {
          std::snprintf(buf, sizeof buf, "\x1b[38;5;%dm\xe2\x96\x80", top);
        }
        s += buf;
      }
      s += "\x1b[0m";
      const std::string a = TerminalSafe(Label(m.row_labels, i));
      s +=
          " " + a + (i + 1 < m.rows ? " / " + TerminalSafe(Label(m.row_labels, i + 1)) : "") + "\n";
    }
  }
  s += "scale: ";
  for (int k = 0; k <= 10; ++k) {
    std::snprintf(buf, sizeof buf, "\x1b[48;5;%dm  ", Xterm256(WeightColour(k / 10.0f)));
    s += buf;
  }
  s += "\x1b[0m 0 .. 1\n";
  return s;
}

}  // namespace qkv::inspect
