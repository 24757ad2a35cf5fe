//! The tile order of the persistent wgmma matmul (`kernels/raster.h`), run on the host by
//! the same C++ the kernel compiles: every tile visited exactly once, in bands of the
//! requested height, row order kept for a band of one, and what the bands save in panels
//! of A and B in flight at once. The checker is shown failing on broken orders.

use headroom::kernels::tile_coord;

type Order<'a> = &'a dyn Fn(i64, i32, i32, i32) -> (i32, i32, i32);

/// Every tile of `batch` grids of `tiles_m` x `tiles_n` visited once, batch entries one
/// after another, each tile row inside its band of `group` rows (row order for 0 and 1).
fn check_order(f: Order, tiles_m: i32, tiles_n: i32, batch: i32, group: i32) -> Result<(), String> {
    let per_batch = tiles_m as i64 * tiles_n as i64;
    let mut seen = vec![false; (per_batch * batch as i64) as usize];
    for t in 0..per_batch * batch as i64 {
        let (bz, tm, tn) = f(t, tiles_m, tiles_n, group);
        if !(0..batch).contains(&bz) || !(0..tiles_m).contains(&tm) || !(0..tiles_n).contains(&tn) {
            return Err(format!(
                "tile {t} -> ({bz}, {tm}, {tn}) is outside the grid"
            ));
        }
        if bz as i64 != t / per_batch {
            return Err(format!(
                "tile {t} is in batch entry {bz}, not {}",
                t / per_batch
            ));
        }
        let r = t % per_batch;
        let want_band = if group <= 1 {
            r / tiles_n as i64
        } else {
            r / (group as i64 * tiles_n as i64)
        };
        let band = if group <= 1 { tm } else { tm / group };
        if band as i64 != want_band {
            return Err(format!("tile {t} -> row {tm}, outside band {want_band}"));
        }
        if group <= 1 && (tm as i64, tn as i64) != (r / tiles_n as i64, r % tiles_n as i64) {
            return Err(format!("tile {t} -> ({tm}, {tn}) is not row order"));
        }
        let k = (bz as i64 * per_batch + tm as i64 * tiles_n as i64 + tn as i64) as usize;
        if std::mem::replace(&mut seen[k], true) {
            return Err(format!("tile ({bz}, {tm}, {tn}) is visited twice"));
        }
    }
    Ok(())
}

const GRIDS: [(i32, i32, i32); 8] = [
    (1, 1, 1),
    (1, 7, 1),
    (7, 1, 2),
    (8, 8, 1),
    (9, 5, 3),
    (13, 64, 1),
    (64, 64, 1),
    (33, 17, 4),
];

#[test]
fn every_tile_once_in_its_band() {
    for (tiles_m, tiles_n, batch) in GRIDS {
        for group in [0, 1, 2, 3, 8, 16, 100] {
            check_order(&tile_coord, tiles_m, tiles_n, batch, group)
                .unwrap_or_else(|e| panic!("{tiles_m}x{tiles_n}x{batch} group {group}: {e}"));
        }
    }
    // Down each column of the band first: tiles 0..8 of a 64x64 grid in bands of 8 are
    // column 0, rows 0 to 7.
    for t in 0..8 {
        assert_eq!(tile_coord(t, 64, 64, 8), (0, t as i32, 0));
    }
    assert_eq!(tile_coord(8, 64, 64, 8), (0, 0, 1));
    // The last band of a 13-row grid in bands of 8 has 5 rows.
    assert_eq!(tile_coord(8 * 64, 13, 64, 8), (0, 8, 0));
    assert_eq!(tile_coord(8 * 64 + 5, 13, 64, 8), (0, 8, 1));
}

#[test]
fn the_checker_catches_broken_orders() {
    let swapped = |t, m, n, g| {
        let (b, tm, tn) = tile_coord(t, m, n, g);
        (b, tn, tm)
    };
    // A last band as tall as the others: rows past the grid.
    let full_last_band = |t: i64, m: i32, n: i32, g: i32| {
        let per = m as i64 * n as i64;
        let r = t % per;
        let band = r / (g as i64 * n as i64);
        let q = r % (g as i64 * n as i64);
        (
            (t / per) as i32,
            (band * g as i64 + q % g as i64) as i32,
            (q / g as i64) as i32,
        )
    };
    let no_batch = |t, m, n, g| {
        let (_, tm, tn) = tile_coord(t, m, n, g);
        (0, tm, tn)
    };
    // Column order instead of row order for a band of one.
    let column_order = |t: i64, m: i32, n: i32, _g: i32| {
        let per = m as i64 * n as i64;
        let r = t % per;
        (
            (t / per) as i32,
            (r % m as i64) as i32,
            (r / m as i64) as i32,
        )
    };
    let cases: [(&str, Order, i32, i32, i32, i32); 4] = [
        ("rows and columns swapped", &swapped, 9, 5, 1, 3),
        ("a full last band", &full_last_band, 13, 64, 1, 8),
        ("the batch entry dropped", &no_batch, 8, 8, 2, 8),
        ("column order for a band of one", &column_order, 5, 4, 1, 1),
    ];
    for (what, f, m, n, b, g) in cases {
        assert!(
            check_order(f, m, n, b, g).is_err(),
            "{what} passed the checker"
        );
        check_order(&tile_coord, m, n, b, g).unwrap();
    }
}

/// Panels of A (tile rows) and B (tile columns) the `sms` tiles in flight at once touch,
/// averaged over the waves of a `tiles` x `tiles` grid.
fn panels_per_wave(tiles: i32, sms: i64, group: i32) -> f64 {
    let total = tiles as i64 * tiles as i64;
    let mut sum = 0usize;
    let mut waves = 0usize;
    let mut t0 = 0;
    while t0 < total {
        let mut rows = std::collections::BTreeSet::new();
        let mut cols = std::collections::BTreeSet::new();
        for t in t0..(t0 + sms).min(total) {
            let (_, tm, tn) = tile_coord(t, tiles, tiles, group);
            rows.insert(tm);
            cols.insert(tn);
        }
        sum += rows.len() + cols.len();
        waves += 1;
        t0 += sms;
    }
    sum as f64 / waves as f64
}

#[test]
fn bands_keep_fewer_panels_in_flight() {
    // 8192^3 in 128x128 tiles on 132 SMs: a panel is 128 rows of k = 8192 bf16, 2 MiB.
    let row = panels_per_wave(64, 132, 1);
    let banded = panels_per_wave(64, 132, 8);
    println!(
        "panels in flight per wave at 8192^3 on 132 SMs: row order {row:.1} ({:.0} MiB), bands of 8 {banded:.1} ({:.0} MiB)",
        row * 2.0,
        banded * 2.0
    );
    assert!(row > 60.0, "row order touches every panel of B: {row}");
    assert!(
        banded < 30.0,
        "bands of 8 touch 8 of A and about 17 of B: {banded}"
    );
}
