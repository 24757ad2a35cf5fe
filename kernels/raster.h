// raster.h - the order in which a persistent GEMM visits its output tiles.
//
// Plain C++ so that the host tests (kernels/raster.cpp, built by the host compiler in every
// build, CUDA or not) run the very function the wgmma kernel runs.
//
// Tile t of a batch of tiles_m x tiles_n tiles:
//   group <= 1: row by row, n fastest (tile t is row t / tiles_n, column t % tiles_n);
//   group = G:  in bands of G tile rows; inside a band, down each column of G tiles, then the
//               next column (the last band has the rows that remain).
// A persistent grid takes tiles gridDim.x apart, so the tiles in flight at once are about
// gridDim.x consecutive ones: in row order they span a row or two of A's panels and every
// panel of B; in bands of G they span G panels of A and gridDim.x / G of B, which the L2
// keeps between their reuses.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define HR_HD __host__ __device__ __forceinline__
#else
#define HR_HD inline
#endif

struct HrTileCoord {
    int bz; // batch entry
    int tm; // tile row (rows tm*BM ..)
    int tn; // tile column (cols tn*BN ..)
};

HR_HD HrTileCoord hr_tile_coord(int64_t t, int tiles_m, int tiles_n, int group) {
    const int64_t per_batch = (int64_t)tiles_m * tiles_n;
    HrTileCoord c;
    c.bz = (int)(t / per_batch);
    const int64_t r = t - (int64_t)c.bz * per_batch;
    if (group <= 1) {
        c.tm = (int)(r / tiles_n);
        c.tn = (int)(r % tiles_n);
        return c;
    }
    const int64_t per_band = (int64_t)group * tiles_n;
    const int band = (int)(r / per_band);
    const int first = band * group;
    const int rows = tiles_m - first < group ? tiles_m - first : group;
    const int64_t q = r - (int64_t)band * per_band;
    c.tm = first + (int)(q % rows);
    c.tn = (int)(q / rows);
    return c;
}
