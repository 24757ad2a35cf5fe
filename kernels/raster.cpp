// raster.cpp - the tile order of kernels/raster.h, for the host tests (tests/raster.rs).
// Built by the host compiler in every build, so the order is tested with or without nvcc.
#include "raster.h"

extern "C" void hr_tile_coord_host(int64_t t, int32_t tiles_m, int32_t tiles_n, int32_t group,
                                   int32_t *out) {
    const HrTileCoord c = hr_tile_coord(t, tiles_m, tiles_n, group);
    out[0] = c.bz;
    out[1] = c.tm;
    out[2] = c.tn;
}
