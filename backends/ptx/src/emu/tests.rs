//! The interpreter's own tests: each instruction family and each error it must report.

use super::exec::*;
use super::memory::*;
use super::parse::*;
use super::*;

/// Runs kernel `k` of `ptx` on one warp with an output buffer of `words` u32 (its only
/// parameter); returns what the kernel left there.
fn run_one_warp(ptx: &str, words: usize) -> Result<Vec<u32>, EmuError> {
    let m = Module::parse(ptx)?;
    let mut mem = Memory::new();
    let out = mem.alloc(&vec![0; 4 * words]);
    run(
        &m,
        "k",
        &Launch {
            grid: 1,
            block: 32,
            params: &[out],
        },
        &mut mem,
    )?;
    mem.read_u32(out, words)
}

#[test]
fn f16_conversions_round_to_nearest_even_and_keep_subnormals() {
    for (v, h) in [
        (1.0f32, 0x3C00u16),
        (-2.0, 0xC000),
        (65504.0, 0x7BFF),
        (65519.0, 0x7BFF),
        (65520.0, 0x7C00),
        (2f32.powi(-14), 0x0400),
        (2f32.powi(-24), 0x0001),
        (2f32.powi(-25), 0x0000),
        (3.0 * 2f32.powi(-25), 0x0002),
        (0.1, 0x2E66),
    ] {
        assert_eq!(f32_to_f16(v), h, "{v}");
    }
    // Halfway between 1 and 1 + 2^-10: ties go to the even one.
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
    assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
    // Every half widens exactly and narrows back to itself.
    for h in (0u16..=0xFFFF).filter(|h| (h >> 10) & 0x1F != 0x1F) {
        assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
    }
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    assert_eq!(f32_to_bf16(1.0), 0x3F80);
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
    assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
    assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
    assert_eq!(bf16_to_f32(0x3F80), 1.0);
}

#[test]
fn partial_warp_shuffle_is_an_error() {
    let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.reg .b32 %r<3>;\n\t.reg .pred %p<1>;\n\tmov.u32 %r0, %tid.x;\n\tsetp.eq.u32 %p0, %r0, 3;\n\t@%p0 bra $end;\n\tshfl.sync.bfly.b32 %r1, %r0, 1, 31, -1;\n$end:\n\tret;\n}\n";
    let e = run_one_warp(ptx, 1).unwrap_err();
    assert!(e.0.contains("only part of a warp"), "{e}");
}

#[test]
fn launch_beyond_maxntid_is_an_error() {
    let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n.maxntid 16, 1, 1\n.minnctapersm 8\n{\n\tret;\n}\n";
    let e = run_one_warp(ptx, 1).unwrap_err();
    assert!(e.0.contains(".maxntid"), "{e}");
    // Blocks past 256 threads need launch bounds at all.
    let m = Module::parse(".visible .entry k(\n\t.param .u64 out\n)\n{\n\tret;\n}\n").unwrap();
    let mut mem = Memory::new();
    let out = mem.alloc(&[0; 4]);
    let params = [out];
    let launch = |block| Launch {
        grid: 1,
        block,
        params: &params,
    };
    assert!(run(&m, "k", &launch(256), &mut mem).is_ok());
    let e = run(&m, "k", &launch(288), &mut mem).unwrap_err();
    assert!(e.0.contains("without launch bounds"), "{e}");
}

/// Lane 8m + r gives the address of row r of matrix m; register m of lane L receives word
/// L % 4 of row L / 4 of matrix m. Rows are interleaved in shared memory so that the
/// addresses, not the order, decide.
#[test]
fn ldmatrix_distributes_rows_as_the_isa_says() {
    let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 16 .b8 s[512];\n\t.reg .b32 %r<12>;\n\t.reg .b64 %rd<8>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tshl.b32 %r1, %r0, 2;\n\tadd.u32 %r2, %r1, 1;\n\tadd.u32 %r3, %r1, 2;\n\tadd.u32 %r4, %r1, 3;\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.v4.b32 [%rd4], {%r1, %r2, %r3, %r4};\n\tbar.sync 0;\n\tand.b32 %r5, %r0, 7;\n\tshr.u32 %r6, %r0, 3;\n\tmad.lo.u32 %r7, %r5, 4, %r6;\n\tmul.wide.u32 %rd3, %r7, 16;\n\tadd.u64 %rd5, %rd2, %rd3;\n\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r8, %r9, %r10, %r11}, [%rd5];\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd6, %rd1, %rd3;\n\tst.global.v4.u32 [%rd6], {%r8, %r9, %r10, %r11};\n\tret;\n}\n";
    let got = run_one_warp(ptx, 128).unwrap();
    for lane in 0..32u32 {
        for matrix in 0..4u32 {
            // Row (matrix, lane / 4) is stored at row slot (lane / 4) · 4 + matrix.
            let want = ((lane / 4) * 4 + matrix) * 4 + lane % 4;
            assert_eq!(
                got[(lane * 4 + matrix) as usize],
                want,
                "lane {lane} matrix {matrix}"
            );
        }
    }
}

/// With `.trans` each lane receives a column pair of the matrix: register m of lane L holds
/// elements (2·(L % 4), L / 4) and (2·(L % 4) + 1, L / 4) of matrix m. Row slot s holds the
/// 16-bit elements 8s..8s+7, rows interleaved as above.
#[test]
fn ldmatrix_trans_distributes_columns_as_the_isa_says() {
    let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 16 .b8 s[512];\n\t.reg .b32 %r<20>;\n\t.reg .b64 %rd<8>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tshl.b32 %r1, %r0, 3;\n\tmad.lo.u32 %r12, %r1, 65537, 65536;\n\tadd.u32 %r2, %r12, 131074;\n\tadd.u32 %r3, %r12, 262148;\n\tadd.u32 %r4, %r12, 393222;\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.v4.b32 [%rd4], {%r12, %r2, %r3, %r4};\n\tbar.sync 0;\n\tand.b32 %r5, %r0, 7;\n\tshr.u32 %r6, %r0, 3;\n\tmad.lo.u32 %r7, %r5, 4, %r6;\n\tmul.wide.u32 %rd3, %r7, 16;\n\tadd.u64 %rd5, %rd2, %rd3;\n\tldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r8, %r9, %r10, %r11}, [%rd5];\n\tmul.wide.u32 %rd3, %r0, 16;\n\tadd.u64 %rd6, %rd1, %rd3;\n\tst.global.v4.u32 [%rd6], {%r8, %r9, %r10, %r11};\n\tret;\n}\n";
    let got = run_one_warp(ptx, 128).unwrap();
    let element = |matrix: u32, row: u32, col: u32| (row * 4 + matrix) * 8 + col;
    for lane in 0..32u32 {
        for matrix in 0..4u32 {
            let (row, col) = (2 * (lane % 4), lane / 4);
            let want = element(matrix, row, col) | element(matrix, row + 1, col) << 16;
            assert_eq!(
                got[(lane * 4 + matrix) as usize],
                want,
                "lane {lane} matrix {matrix}"
            );
        }
    }
}

#[test]
fn barrier_orders_shared_memory() {
    // Thread i writes i to shared[i]; after the barrier it reads shared[31 - i].
    let ptx = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.shared .align 4 .b8 s[128];\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<6>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd1, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.u32 [%rd4], %r0;\n\tbar.sync 0;\n\tsub.u32 %r1, 31, %r0;\n\tmul.wide.u32 %rd3, %r1, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tld.shared.u32 %r2, [%rd4];\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd5, %rd1, %rd3;\n\tst.global.u32 [%rd5], %r2;\n\tret;\n}\n";
    let got = run_one_warp(ptx, 32).unwrap();
    assert_eq!(got, (0..32).rev().collect::<Vec<u32>>());
}

#[test]
fn nothing_before_griddepcontrol_wait_touches_what_kernels_write() {
    // Thread i copies p[i + 32] to p[i], waiting for earlier kernels at `wait` (0: first,
    // 1: between the load and the store, 2: last, 3: never).
    let copy = |wait: usize| {
        let w = |at| {
            if at == wait {
                "griddepcontrol.wait;"
            } else {
                ""
            }
        };
        format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\t{}\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tld.global.u32 %r1, [%rd2+128];\n\t{}\n\tst.global.u32 [%rd2], %r1;\n\t{}\n\tret;\n}}\n", w(0), w(1), w(2))
    };
    // Two launches: the first copies host-written words 64.. to 32..; the second reads
    // those (a kernel's output) into 0...
    let run_twice = |ptx: &str| -> Result<(), EmuError> {
        let m = Module::parse(ptx)?;
        let mut mem = Memory::new();
        let out = mem.alloc(&[0; 4 * 128]);
        for p in [out + 128, out] {
            let launch = Launch {
                grid: 1,
                block: 32,
                params: &[p],
            };
            run(&m, "k", &launch, &mut mem)?;
        }
        Ok(())
    };
    assert!(run_twice(&copy(0)).is_ok());
    // Reading what the host wrote before the wait is allowed, what a kernel wrote is not.
    let e = run_twice(&copy(1)).unwrap_err();
    assert!(
        e.0.contains("which a kernel wrote, before griddepcontrol.wait"),
        "{e}"
    );
    let e = run_twice(&copy(2)).unwrap_err();
    assert!(
        e.0.contains("writes global memory") && e.0.contains("before"),
        "{e}"
    );
    // A kernel without a wait is launched plainly: nothing to check.
    assert!(run_twice(&copy(3)).is_ok());
}

#[test]
fn non_coherent_loads_of_what_the_launch_writes_are_errors() {
    // Each thread stores to p[i], then loads p[i] (its own write: no race) with `load`.
    let kernel = |load: &str| {
        format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r0;\n\t{load} %r1, [%rd2];\n\tst.global.u32 [%rd2+128], %r1;\n\tret;\n}}\n")
    };
    assert!(run_one_warp(&kernel("ld.global.u32"), 64).is_ok());
    let e = run_one_warp(&kernel("ld.global.nc.u32"), 64).unwrap_err();
    assert!(e.0.contains("non-coherent"), "{e}");
    // Each thread reads p[i + 1] (written by no kernel), then, after a barrier (so no
    // race), writes p[i]: thread i + 1's write lands on a word thread i read through the
    // non-coherent cache in the same launch.
    let write_after = |load: &str| {
        format!(".visible .entry k(\n\t.param .u64 p\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [p];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\t{load} %r1, [%rd2+4];\n\tbar.sync 0;\n\tst.global.u32 [%rd2], %r1;\n\tret;\n}}\n")
    };
    assert!(run_one_warp(&write_after("ld.global.u32"), 64).is_ok());
    let e = run_one_warp(&write_after("ld.global.nc.u32"), 64).unwrap_err();
    assert!(
        e.0.contains("written after a read through the non-coherent"),
        "{e}"
    );
}

/// A kernel, its launch shape, and whether the interpreter reports a data race in it.
fn races(ptx: &str, grid: u32) -> bool {
    let m = Module::parse(ptx).unwrap();
    let mut mem = Memory::new();
    let out = mem.alloc(&[0; 4 * 64]);
    match run(
        &m,
        "k",
        &Launch {
            grid,
            block: 32,
            params: &[out],
        },
        &mut mem,
    ) {
        Ok(_) => false,
        Err(e) if e.0.contains("data race") => true,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn data_races_are_errors() {
    let shared_swap = |barrier: &str| {
        format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.shared .align 4 .b8 s[128];\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<6>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tst.shared.u32 [%rd4], %r0;\n\t{barrier}\n\tsub.u32 %r1, 31, %r0;\n\tmul.wide.u32 %rd3, %r1, 4;\n\tadd.u64 %rd4, %rd2, %rd3;\n\tld.shared.u32 %r2, [%rd4];\n\tmul.wide.u32 %rd3, %r0, 4;\n\tadd.u64 %rd5, %rd0, %rd3;\n\tst.global.u32 [%rd5], %r2;\n\tret;\n}}\n")
    };
    // Reading another thread's shared write: ordered by a barrier, a race without one.
    assert!(!races(&shared_swap("bar.sync 0;"), 1));
    assert!(races(&shared_swap(""), 1));
    // Each thread writes out[tid]: one block is fine; two blocks write the same words.
    let global_store = ".visible .entry k(\n\t.param .u64 out\n)\n{\n\t.reg .b32 %r<2>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r0;\n\tret;\n}\n";
    assert!(!races(global_store, 1));
    assert!(races(global_store, 2));
    // Thread i reads out[i + 1], then writes out[i]: its neighbour's write races its read
    // (a barrier between them orders them, within one block).
    let shift = |barrier: &str| {
        format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tld.global.u32 %r1, [%rd2+4];\n\t{barrier}\n\tst.global.u32 [%rd2], %r1;\n\tret;\n}}\n")
    };
    assert!(races(&shift(""), 1));
    assert!(!races(&shift("bar.sync 0;"), 1));
}

#[test]
fn atomic_adds_sum_across_threads_and_blocks_but_race_plain_accesses() {
    // Every thread of every block adds its tid + 1 to s[0] (shared), then, after `barrier`,
    // thread 0 reads s[0] and adds it to out[0] (global, atomically: blocks share it).
    let kernel = |barrier: &str| {
        format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.shared .align 8 .b8 s[8];\n\t.reg .pred %p<1>;\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<6>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmov.u64 %rd2, s;\n\tadd.u32 %r1, %r0, 1;\n\tatom.shared.add.u32 %r2, [%rd2], %r1;\n\t{barrier}\n\tsetp.ne.u32 %p0, %r0, 0;\n\t@%p0 bra $done;\n\tld.shared.u32 %r3, [%rd2];\n\tcvt.u64.u32 %rd3, %r3;\n\tred.global.add.u64 [%rd0], %rd3;\n$done:\n\tret;\n}}\n")
    };
    let m = Module::parse(&kernel("bar.sync 0;")).unwrap();
    let mut mem = Memory::new();
    let out = mem.alloc(&[0; 8]);
    let launch = Launch {
        grid: 3,
        block: 32,
        params: &[out],
    };
    run(&m, "k", &launch, &mut mem).unwrap();
    // 3 blocks · (1 + … + 32).
    assert_eq!(mem.read_u32(out, 2).unwrap(), [3 * 528, 0]);
    // Without the barrier thread 0's plain read races the other threads' atomics.
    assert!(races(&kernel(""), 1));
}

#[test]
fn float_comparisons_are_ordered_unless_named_unordered() {
    // Lane i compares a[i] with b[i] (a = 1, NaN, 2; b = 1, 1, NaN) by `ne`, then by `geu`.
    let kernel = |cmp: &str| {
        format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.reg .pred %p<1>;\n\t.reg .b32 %r<3>;\n\t.reg .f32 %f<2>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [out];\n\tmov.u32 %r0, %tid.x;\n\tmov.f32 %f0, 0f3F800000;\n\tmov.f32 %f1, 0f3F800000;\n\tsetp.eq.u32 %p0, %r0, 1;\n\t@%p0 mov.f32 %f0, 0f7FC00000;\n\tsetp.eq.u32 %p0, %r0, 2;\n\t@%p0 mov.f32 %f0, 0f40000000;\n\t@%p0 mov.f32 %f1, 0f7FC00000;\n\tsetp.{cmp}.f32 %p0, %f0, %f1;\n\tselp.u32 %r1, 1, 0, %p0;\n\tmul.wide.u32 %rd1, %r0, 4;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r1;\n\tret;\n}}\n")
    };
    let lanes = |cmp: &str| run_one_warp(&kernel(cmp), 32).unwrap()[..3].to_vec();
    assert_eq!(lanes("ne"), [0, 0, 0]);
    assert_eq!(lanes("neu"), [0, 1, 1]);
    assert_eq!(lanes("ge"), [1, 0, 0]);
    assert_eq!(lanes("geu"), [1, 1, 1]);
    assert_eq!(lanes("lt"), [0, 0, 0]);
    assert_eq!(lanes("ltu"), [0, 1, 1]);
}

/// A kernel summing the first word of eight 128-byte lines of `inp` into `out`: loads inside
/// a loop that uses each before the next (`chained`), or in one basic block, each followed by
/// its use.
fn eight_loads(chained: bool) -> String {
    let body = if chained {
        "\tmov.u32 %r0, 0;\nloop:\n\tmul.wide.u32 %rd2, %r0, 128;\n\tadd.u64 %rd3, %rd0, %rd2;\n\tld.global.f32 %f1, [%rd3];\n\tadd.f32 %f0, %f0, %f1;\n\tadd.u32 %r0, %r0, 1;\n\tsetp.lt.u32 %p0, %r0, 8;\n\t@%p0 bra loop;\n".to_string()
    } else {
        let mut b = String::new();
        for i in 0..8 {
            b += &format!("\tld.global.f32 %f{}, [%rd0+{}];\n", 10 + i, 128 * i);
            b += &format!("\tmul.f32 %f{}, %f{}, %f{};\n", 10 + i, 10 + i, 10 + i);
        }
        for i in 0..8 {
            b += &format!("\tadd.f32 %f0, %f0, %f{};\n", 10 + i);
        }
        b
    };
    format!(
        ".visible .entry k(\n\t.param .u64 inp,\n\t.param .u64 out\n)\n{{\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<4>;\n\t.reg .f32 %f<20>;\n\t.reg .pred %p<2>;\n\tld.param.u64 %rd0, [inp];\n\tld.param.u64 %rd1, [out];\n\tcvta.to.global.u64 %rd0, %rd0;\n\tcvta.to.global.u64 %rd1, %rd1;\n\tmov.f32 %f0, 0f00000000;\n{body}\tst.global.f32 [%rd1], %f0;\n\tret;\n}}\n"
    )
}

/// Writes one word of each of the eight lines `eight_loads` reads.
const WRITE_EIGHT_LINES: &str = ".visible .entry w(\n\t.param .u64 inp\n)\n{\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd0, [inp];\n\tcvta.to.global.u64 %rd0, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 128;\n\tadd.u64 %rd2, %rd0, %rd1;\n\tst.global.u32 [%rd2], %r0;\n\tret;\n}\n";

/// The latency model's critical path of `eight_loads`, the lines fresh from another kernel's
/// writes or not.
fn eight_loads_cycles(chained: bool, written_before: bool) -> u64 {
    let m = Module::parse(&eight_loads(chained)).unwrap();
    let mut mem = Memory::new();
    mem.enable_timing(Latencies::default());
    let inp = mem.alloc(&vec![0; 1024]);
    let out = mem.alloc(&[0; 4]);
    if written_before {
        let w = Module::parse(WRITE_EIGHT_LINES).unwrap();
        let launch = Launch {
            grid: 1,
            block: 8,
            params: &[inp],
        };
        run(&w, "w", &launch, &mut mem).unwrap();
    }
    let launch = Launch {
        grid: 1,
        block: 1,
        params: &[inp, out],
    };
    run(&m, "k", &launch, &mut mem).unwrap();
    mem.last_launch_cycles().unwrap()
}

#[test]
fn latency_model_charges_each_wait_on_memory() {
    let lat = Latencies::default();
    // A loop that waits on each load before issuing the next pays DRAM's latency eight times;
    // loads in one basic block once, even each followed by its use (a scheduler such as
    // ptxas's issues them first).
    let chained = eight_loads_cycles(true, false);
    let together = eight_loads_cycles(false, false);
    assert!(chained >= 8 * lat.dram, "{chained}");
    assert!(chained < 8 * lat.dram + 400, "{chained}");
    assert!(
        together >= lat.dram && together < lat.dram + 100,
        "{together}"
    );
    // Lines a kernel just wrote are in L2.
    let warm = eight_loads_cycles(true, true);
    assert!(warm >= 8 * lat.l2 && warm < 8 * lat.l2 + 400, "{warm}");
    // Without timing, nothing is reported.
    assert_eq!(Memory::new().last_launch_cycles(), None);
}

#[test]
fn latency_model_releases_a_barrier_with_its_last_thread() {
    // Thread 0 waits on a DRAM load before the barrier; every thread leaves after it.
    let ptx = ".visible .entry k(\n\t.param .u64 inp\n)\n{\n\t.reg .b32 %r<4>;\n\t.reg .b64 %rd<4>;\n\t.reg .pred %p<2>;\n\tld.param.u64 %rd0, [inp];\n\tcvta.to.global.u64 %rd0, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tsetp.ne.u32 %p0, %r0, 0;\n\t@%p0 bra join;\n\tld.global.u32 %r1, [%rd0];\n\tadd.u32 %r1, %r1, 1;\njoin:\n\tbar.sync 0;\n\tret;\n}\n";
    let m = Module::parse(ptx).unwrap();
    let mut mem = Memory::new();
    let lat = Latencies::default();
    mem.enable_timing(lat);
    let inp = mem.alloc(&[0; 4]);
    let launch = Launch {
        grid: 2,
        block: 64,
        params: &[inp],
    };
    run(&m, "k", &launch, &mut mem).unwrap();
    let cycles = mem.last_launch_cycles().unwrap();
    assert!(
        cycles >= lat.dram + lat.barrier && cycles < lat.dram + lat.barrier + 50,
        "{cycles}"
    );
}

#[test]
fn latency_model_overlaps_independent_shuffle_chains() {
    // Two warp reductions of five shuffles each, independent of each other: a scheduler
    // interleaves them, so together they take about as long as one, not twice.
    let reduce = |regs: &[&str]| {
        let mut b = String::new();
        for off in [16, 8, 4, 2, 1] {
            for r in regs {
                b += &format!(
                    "\tshfl.sync.bfly.b32 %f9, {r}, {off}, 31, -1;\n\tadd.f32 {r}, {r}, %f9;\n"
                );
            }
        }
        b
    };
    let kernel = |body: String| {
        format!(".visible .entry k(\n\t.param .u64 out\n)\n{{\n\t.reg .b32 %r<2>;\n\t.reg .b64 %rd<4>;\n\t.reg .f32 %f<12>;\n\tld.param.u64 %rd0, [out];\n\tcvta.to.global.u64 %rd0, %rd0;\n\tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd1, %r0, 8;\n\tadd.u64 %rd0, %rd0, %rd1;\n\tmov.f32 %f0, 0f3F800000;\n\tmov.f32 %f1, 0f40000000;\n{body}\tst.global.v2.f32 [%rd0], {{%f0, %f1}};\n\tret;\n}}\n")
    };
    let cycles = |ptx: String| {
        let m = Module::parse(&ptx).unwrap();
        let mut mem = Memory::new();
        mem.enable_timing(Latencies::default());
        let out = mem.alloc(&[0; 256]);
        let launch = Launch {
            grid: 1,
            block: 32,
            params: &[out],
        };
        run(&m, "k", &launch, &mut mem).unwrap();
        mem.last_launch_cycles().unwrap()
    };
    let one = cycles(kernel(reduce(&["%f0"])));
    let two = cycles(kernel(reduce(&["%f0", "%f1"])));
    let lat = Latencies::default();
    assert!(one >= 5 * (lat.shuffle + lat.alu), "{one}");
    assert!(two < one + 20, "one chain {one} cycles, two {two}");
}

/// The last-block-done pattern: every thread of every block writes its partial
/// (block · ntid + tid + 1), then `{wfence}`, a barrier, and thread 0 counts the block done
/// with `atom.inc` (`{rfence}` after it) and tells its block whether it was the last; the
/// last block's thread tid sums partial tid of every block into out[tid].
fn last_block(wfence: &str, barrier: &str, rfence: &str) -> String {
    format!(
        ".visible .entry k(\n\t.param .u64 out,\n\t.param .u64 part,\n\t.param .u64 count\n)\n{{
\t.shared .align 4 .b8 last[4];
\t.reg .pred %p<3>;
\t.reg .b32 %r<10>;
\t.reg .b64 %rd<6>;
\tld.param.u64 %rd0, [out];
\tld.param.u64 %rd1, [part];
\tld.param.u64 %rd2, [count];
\tmov.u32 %r0, %tid.x;
\tmov.u32 %r1, %ctaid.x;
\tmov.u32 %r2, %ntid.x;
\tmov.u32 %r3, %nctaid.x;
\tmad.lo.u32 %r4, %r1, %r2, %r0;
\tmul.wide.u32 %rd3, %r4, 4;
\tadd.u64 %rd4, %rd1, %rd3;
\tadd.u32 %r5, %r4, 1;
\tst.global.u32 [%rd4], %r5;
\t{wfence}
\t{barrier}
\tsetp.ne.u32 %p0, %r0, 0;
\t@%p0 bra $wait;
\tsub.u32 %r6, %r3, 1;
\tatom.global.inc.u32 %r7, [%rd2], %r6;
\t{rfence}
\tsetp.eq.u32 %p1, %r7, %r6;
\tselp.u32 %r8, 1, 0, %p1;
\tst.shared.u32 [last], %r8;
$wait:
\tbar.sync 0;
\tld.shared.u32 %r8, [last];
\tsetp.eq.u32 %p2, %r8, 0;
\t@%p2 bra $done;
\tmov.u32 %r9, 0;
\tmov.u32 %r5, 0;
$loop:
\tmad.lo.u32 %r4, %r5, %r2, %r0;
\tmul.wide.u32 %rd3, %r4, 4;
\tadd.u64 %rd4, %rd1, %rd3;
\tld.global.u32 %r6, [%rd4];
\tadd.u32 %r9, %r9, %r6;
\tadd.u32 %r5, %r5, 1;
\tsetp.lt.u32 %p0, %r5, %r3;
\t@%p0 bra $loop;
\tmul.wide.u32 %rd3, %r0, 4;
\tadd.u64 %rd4, %rd0, %rd3;
\tst.global.u32 [%rd4], %r9;
$done:
\tret;
}}
"
    )
}

/// Runs `ptx` (`last_block`) twice on 5 blocks of 32 threads in `order`: out, and the counter.
fn run_last_block(ptx: &str, order: BlockOrder) -> Result<(Vec<u32>, u32), EmuError> {
    let m = Module::parse(ptx)?;
    let mut mem = Memory::new();
    mem.set_block_order(order);
    let (out, part, count) = (
        mem.alloc(&[0; 4 * 32]),
        mem.alloc(&[0; 4 * 160]),
        mem.alloc(&[0; 4]),
    );
    let launch = Launch {
        grid: 5,
        block: 32,
        params: &[out, part, count],
    };
    for _ in 0..2 {
        run(&m, "k", &launch, &mut mem)?;
    }
    Ok((mem.read_u32(out, 32)?, mem.read_u32(count, 1)?[0]))
}

#[test]
fn the_last_block_reads_what_other_blocks_released_through_a_fence_and_an_atomic() {
    let good = last_block("fence.acq_rel.gpu;", "bar.sync 0;", "fence.acq_rel.gpu;");
    let want: Vec<u32> = (0..32)
        .map(|t| (0..5).map(|b| b * 32 + t + 1).sum())
        .collect();
    for order in [
        BlockOrder::Forward,
        BlockOrder::Reverse,
        BlockOrder::Shuffled(7),
    ] {
        let (out, count) = run_last_block(&good, order).unwrap();
        // atom.inc wraps the counter back to 0 with the last block: ready for the next launch.
        assert_eq!((out, count), (want.clone(), 0), "{order:?}");
    }
    let race = |ptx: &str| {
        let e = run_last_block(ptx, BlockOrder::Shuffled(3)).unwrap_err();
        assert!(e.0.contains("data race"), "{e}");
    };
    // The writers' fence, their barrier before the atomic, and the last block's fence after
    // it are each needed.
    race(&last_block("", "bar.sync 0;", "fence.acq_rel.gpu;"));
    race(&last_block("fence.acq_rel.gpu;", "", "fence.acq_rel.gpu;"));
    race(&last_block("fence.acq_rel.gpu;", "bar.sync 0;", ""));
    // membar.gl is the same fence; a block-scope one is not modelled.
    assert!(run_last_block(
        &last_block("membar.gl;", "bar.sync 0;", "membar.gl;"),
        BlockOrder::Reverse
    )
    .is_ok());
    let e = run_last_block(
        &last_block("fence.acq_rel.cta;", "bar.sync 0;", "fence.acq_rel.gpu;"),
        BlockOrder::Forward,
    )
    .unwrap_err();
    assert!(e.0.contains("gpu- or system-scope"), "{e}");
}

#[test]
fn shuffled_block_orders_are_permutations_that_change_between_launches() {
    let mut mem = Memory::new();
    mem.set_block_order(BlockOrder::Shuffled(1));
    let (a, b) = (mem.blocks(40), mem.blocks(40));
    assert_ne!(a, b);
    for order in [a, b] {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
    }
}

/// Two warpgroups (256 threads) each multiply a 64×16 A of ones (registers) by a 16×8 B of
/// ones that threads 0..15 stored in shared memory (`wgmma.mma_async.m64n8k16`, no swizzle:
/// two core matrices of 128 bytes), then `between` (after the first commit: more `wgmma`s, the
/// waits), `after`, and `store` (each thread's first accumulator to out[tid]). What the
/// interpreter returns: the out words as f32, or its error.
fn wgmma_kernel(between: &str, after: &str, store: &str) -> Result<Vec<f32>, EmuError> {
    let desc = (8u64 << 16) | (16u64 << 32);
    let ptx = format!(
        "
.visible .entry k(
	.param .u64 out
)
{{
	.shared .align 16 .b8 s[256];
	.reg .b32 %r<8>;
	.reg .b64 %rd<8>;
	.reg .f32 %f<4>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [out];
	mov.u32 %r0, %tid.x;
	mov.u64 %rd2, s;
	setp.lt.u32 %p0, %r0, 16;
	mov.u32 %r1, 1065369472;
	mul.wide.u32 %rd3, %r0, 16;
	add.u64 %rd4, %rd2, %rd3;
	@%p0 st.shared.v4.b32 [%rd4], {{%r1, %r1, %r1, %r1}};
	fence.proxy.async.shared::cta;
	bar.sync 0;
	shr.u64 %rd5, %rd2, 4;
	and.b64 %rd5, %rd5, 16383;
	or.b64 %rd5, %rd5, {desc};
	mov.u32 %r2, %r1;
	mov.u32 %r3, %r1;
	mov.u32 %r4, %r1;
	mov.u32 %r5, %r1;
	setp.ne.u32 %p1, %r0, %r0;
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {{%f0, %f1, %f2, %f3}}, {{%r2, %r3, %r4, %r5}}, %rd5, %p1, 1, 1, 0;
	wgmma.commit_group.sync.aligned;
	{between}
	{after}
	mul.wide.u32 %rd3, %r0, 4;
	add.u64 %rd6, %rd0, %rd3;
	{store}
	ret;
}}
"
    );
    let m = Module::parse(&ptx)?;
    let mut mem = Memory::new();
    let out = mem.alloc(&[0; 4 * 256]);
    run(
        &m,
        "k",
        &Launch {
            grid: 1,
            block: 256,
            params: &[out],
        },
        &mut mem,
    )?;
    mem.read_f32(out, 256)
}

/// A `wgmma` keeps its registers and shared rows until `wgmma.wait_group` retires its group:
/// reading its accumulators, storing to what it reads (from any thread, or from the other
/// warpgroup without a barrier after the wait), or ending before the wait are errors; `wgmma`s
/// may accumulate into the registers of one still in flight, and `wait_group n` leaves the
/// newest n groups in flight.
#[test]
fn wgmma_operands_stay_in_flight_until_wait_group() {
    const WAIT0: &str = "wgmma.wait_group.sync.aligned 0;";
    const STORE: &str = "st.global.f32 [%rd6], %f0;";
    let ok = |between: &str, after: &str| wgmma_kernel(between, after, STORE).unwrap();
    let fails = |between: &str, after: &str, store: &str, why: &str| {
        let e = wgmma_kernel(between, after, store).unwrap_err();
        assert!(e.0.contains(why), "{between} {after}: {e}");
    };
    // 16 products of ones, in every thread's first accumulator.
    assert!(ok(WAIT0, "").iter().all(|&v| v == 16.0));
    // A second wgmma accumulating while the first is in flight, then waits for one group and
    // for none: 32.
    const SECOND: &str = "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f0, %f1, %f2, %f3}, {%r2, %r3, %r4, %r5}, %rd5, 1, 1, 1, 0;\n\twgmma.commit_group.sync.aligned;";
    let two = format!("{SECOND}\n\twgmma.wait_group.sync.aligned 1;\n\t{WAIT0}");
    assert!(ok(&two, "").iter().all(|&v| v == 32.0));
    const IN_FLIGHT: &str = "touches a register of a wgmma still in flight";
    // Without the wait, or waiting only for the older of two groups, the accumulator is read
    // in flight; so is a register of A written (here by the next thread's mov).
    fails("", "", STORE, IN_FLIGHT);
    fails(
        &format!("{SECOND}\n\twgmma.wait_group.sync.aligned 1;"),
        "",
        STORE,
        IN_FLIGHT,
    );
    fails("mov.u32 %r2, 0;", WAIT0, STORE, IN_FLIGHT);
    // Storing to the B tile before the wait; after it, the other warpgroup's store needs a
    // barrier first.
    const STORE_B: &str = "@%p0 st.shared.v4.b32 [%rd4], {%r1, %r1, %r1, %r1};";
    fails(
        STORE_B,
        WAIT0,
        STORE,
        "stores to shared byte 0 that a wgmma still in flight reads",
    );
    let late_store =
        "setp.eq.u32 %p0, %r0, 128;\n\t@%p0 st.shared.v4.b32 [%rd2], {%r1, %r1, %r1, %r1};";
    fails(WAIT0, late_store, STORE, "data race");
    assert!(ok(WAIT0, &format!("bar.sync 0;\n\t{late_store}"))
        .iter()
        .all(|&v| v == 16.0));
    // Ending with a group committed but never waited for.
    fails("", "", "", "ends with a wgmma in flight");
}
