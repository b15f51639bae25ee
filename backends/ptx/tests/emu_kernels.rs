//! Every kernel run through the PTX interpreter (`emu`) on random inputs and compared with a
//! plain Rust reference: the numbers are checked on machines without a GPU.

use griffin_backend_ptx::emu::{run, Launch, Memory, Module};
use griffin_backend_ptx::gemv::{gemv, grid, Epilogue, GemvSpec, WARPS_PER_BLOCK};
use griffin_backend_ptx::module;

/// A small deterministic generator (xorshift) for inputs in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Round to nearest even bf16 (the `half` crate: independent of the interpreter's rounding).
fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

fn bf16_value(h: u16) -> f32 {
    half::bf16::from_bits(h).to_f32()
}

/// A random projection case shared by the projection kernels' tests: inputs for `tokens` rows,
/// weights holding bf16 values (scaled up under a soft-cap so it has something to cap), bias
/// and residual, and the f64 reference output.
struct ProjectionCase {
    n: usize,
    w: usize,
    epilogue: Epilogue,
    x: Vec<f32>,
    wq: Vec<u16>,
    b: Vec<f32>,
    r: Vec<f32>,
}

impl ProjectionCase {
    fn new(rng: &mut Rng, tokens: usize, inputs: u32, width: u32, epilogue: Epilogue) -> Self {
        let (n, w) = (inputs as usize, width as usize);
        let rows = if epilogue == Epilogue::GeGlu {
            2 * w
        } else {
            w
        };
        let x = rng.vec(tokens * n);
        let scale = if matches!(epilogue, Epilogue::SoftCap(_)) {
            4.0
        } else {
            1.0
        };
        let wq = rng
            .vec(rows * n)
            .iter()
            .map(|v| bf16_bits(v * scale))
            .collect();
        let b = rng.vec(rows);
        let r = rng.vec(tokens * w);
        ProjectionCase {
            n,
            w,
            epilogue,
            x,
            wq,
            b,
            r,
        }
    }

    /// The weights as bf16 bytes, or widened to f32 (the same values).
    fn weights(&self, storage: griffin_backend_ptx::rg_lru::Storage) -> Vec<u8> {
        match storage {
            griffin_backend_ptx::rg_lru::Storage::Bf16 => {
                self.wq.iter().flat_map(|h| h.to_le_bytes()).collect()
            }
            griffin_backend_ptx::rg_lru::Storage::F32 => self
                .wq
                .iter()
                .flat_map(|h| bf16_value(*h).to_le_bytes())
                .collect(),
        }
    }

    /// Output column c of token t, where `input(i)` is input i of token t as the kernel
    /// multiplies it (after any norm).
    fn want(
        &self,
        t: usize,
        c: usize,
        bias: bool,
        residual: bool,
        input: impl Fn(usize) -> f64,
    ) -> f64 {
        let n = self.n;
        let dot = |rr: usize| -> f64 {
            (0..n)
                .map(|i| bf16_value(self.wq[rr * n + i]) as f64 * input(i))
                .sum::<f64>()
                + if bias { self.b[rr] as f64 } else { 0.0 }
        };
        let w = self.w;
        let mut v = match self.epilogue {
            Epilogue::None => dot(c),
            Epilogue::GeGlu => gelu(dot(c)) * dot(c + w),
            Epilogue::SoftCap(cap) => (dot(c) / cap as f64).tanh() * cap as f64,
        };
        if residual {
            v += self.r[t * w + c] as f64;
        }
        v
    }
}

fn gelu(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// |a - b|, infinite where either is NaN (an output a kernel never wrote).
fn gap(a: f32, b: f32) -> f32 {
    let d = (a - b).abs();
    if d.is_nan() {
        f32::INFINITY
    } else {
        d
    }
}

/// The largest |a - b|; infinite where either is NaN (outputs start as NaN, so an element a
/// kernel never wrote fails, which `f32::max` alone would skip).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| gap(*x, *y))
        .fold(0.0, f32::max)
}

#[test]
fn gemv_kernels_compute_their_epilogues() {
    let cases = [
        ("plain", 64, 40, false, Epilogue::None, false, None),
        ("bias_residual", 96, 64, true, Epilogue::None, true, None),
        ("geglu", 64, 24, true, Epilogue::GeGlu, false, Some(1e-6)),
        ("normed", 264, 17, true, Epilogue::None, false, Some(1e-6)),
        // Long rows: four steps at a time in every lane, then a tail some lanes take and
        // others do not (2056 = 8·256 + 8).
        ("long", 2056, 9, true, Epilogue::None, true, None),
        (
            "softcap",
            520,
            33,
            false,
            Epilogue::SoftCap(30.0),
            false,
            Some(1e-6),
        ),
        (
            "f32_weights",
            1040,
            20,
            false,
            Epilogue::None,
            false,
            Some(1e-6),
        ),
        // Wider than a warp per row allows (8192 columns): each warp walks 2 or 3 rows.
        ("wide", 64, 8456, true, Epilogue::GeGlu, true, Some(1e-6)),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (name, inputs, width, bias, epilogue, residual, norm) in cases {
        let spec = GemvSpec {
            name: name.into(),
            inputs,
            width,
            bias,
            epilogue,
            residual,
            norm,
            weights: if name == "f32_weights" {
                griffin_backend_ptx::rg_lru::Storage::F32
            } else {
                griffin_backend_ptx::rg_lru::Storage::Bf16
            },
        };
        let case = ProjectionCase::new(&mut rng, 1, inputs, width, epilogue);
        let (n, w, x) = (case.n, case.w, &case.x);
        let gain: Vec<f32> = rng.vec(n).iter().map(|v| 1.0 + v).collect();

        let mut mem = Memory::new();
        let xa = mem.alloc_f32(x);
        let wa = mem.alloc(&case.weights(spec.weights));
        let ba = mem.alloc_f32(&case.b);
        let ra = mem.alloc_f32(&case.r);
        let oa = mem.alloc_f32(&vec![f32::NAN; w]);
        let ga = mem.alloc_f32(&gain);
        let mut params = vec![xa];
        if norm.is_some() {
            params.push(ga);
        }
        params.push(wa);
        if bias {
            params.push(ba);
        }
        if residual {
            params.push(ra);
        }
        params.push(oa);
        let m = Module::parse(&module(&[gemv(&spec)])).unwrap();
        if name == "wide" {
            assert!(grid(&spec) * WARPS_PER_BLOCK * 2 < width, "{}", grid(&spec));
        }
        run(
            &m,
            name,
            &Launch {
                grid: grid(&spec),
                block: 32 * WARPS_PER_BLOCK,
                params: &params,
            },
            &mut mem,
        )
        .unwrap();
        let got = mem.read_f32(oa, w).unwrap();

        let r_norm = match norm {
            Some(eps) => {
                let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
                1.0 / (ms + eps as f64).sqrt()
            }
            None => 1.0,
        };
        let want: Vec<f32> = (0..w)
            .map(|c| {
                case.want(0, c, bias, residual, |i| match norm {
                    Some(_) => x[i] as f64 * r_norm * gain[i] as f64,
                    None => x[i] as f64,
                }) as f32
            })
            .collect();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{name}: max |diff| {diff}\n{got:?}\n{want:?}");
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// One RG-LRU decode step in f64, as GRIFFIN.md defines it.
#[allow(clippy::too_many_arguments)]
fn rg_lru_reference(
    c: usize,
    blocks: usize,
    k: usize,
    pos: i32,
    x: &[f32],
    window: &mut [f32],
    conv_w: &[f32],
    conv_b: &[f32],
    gates: [&[f32]; 4],
    decay: &[f32],
    state: &mut [f32],
    y: &[f32],
) -> Vec<f32> {
    let b = c / blocks;
    let conv: Vec<f64> = (0..c)
        .map(|j| {
            let mut acc = conv_b[j] as f64;
            for tap in 0..k {
                let back = (k - 1 - tap) as i32;
                if pos - back < 0 {
                    continue;
                }
                let u = if tap == k - 1 {
                    x[j]
                } else {
                    window[tap * c + j]
                };
                acc += conv_w[j * k + tap] as f64 * u as f64;
            }
            acc
        })
        .collect();
    let [igw, igb, rgw, rgb] = gates;
    let mut out = vec![0.0; c];
    for j in 0..c {
        let (h, jj) = (j / b, j % b);
        let (mut zx, mut zr) = (igb[j] as f64, rgb[j] as f64);
        for i in 0..b {
            let w = (h * b + i) * b + jj;
            zx += conv[h * b + i] * igw[w] as f64;
            zr += conv[h * b + i] * rgw[w] as f64;
        }
        let log_a = -8.0 * sigmoid(zr) * decay[j] as f64;
        let (a, norm) = if pos == 0 {
            (0.0, 1.0)
        } else {
            (log_a.exp(), (-(2.0 * log_a).exp_m1()).sqrt())
        };
        let hv = a * state[j] as f64 + norm * conv[j] * sigmoid(zx);
        state[j] = hv as f32;
        out[j] = (hv * gelu(y[j] as f64)) as f32;
    }
    for j in 0..c {
        for r in 0..k - 1 {
            window[r * c + j] = if r + 2 == k {
                x[j]
            } else {
                window[(r + 1) * c + j]
            };
        }
    }
    out
}

/// Random RG-LRU weights (f32) for `c` channels in `blocks` gate blocks with conv width `k`,
/// and the step's carried state, both on the host and in the interpreter's memory.
struct RgLruCase {
    c: usize,
    blocks: usize,
    k: usize,
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    /// Input-gate w, input-gate b, recurrent-gate w, recurrent-gate b.
    gates: Vec<Vec<f32>>,
    decay: Vec<f32>,
    window: Vec<f32>,
    state: Vec<f32>,
    /// Device addresses: window, conv w, conv b, the four gate tensors, decay, state.
    device: Vec<u64>,
}

impl RgLruCase {
    /// Gate matrices stored as `gates` (bf16: values rounded first, the reference reads the
    /// rounded values).
    fn new(
        rng: &mut Rng,
        mem: &mut Memory,
        c: usize,
        blocks: usize,
        k: usize,
        gates_storage: griffin_backend_ptx::rg_lru::Storage,
    ) -> RgLruCase {
        use griffin_backend_ptx::rg_lru::Storage;
        let b = c / blocks;
        let conv_w = rng.vec(c * k);
        let conv_b = rng.vec(c);
        let matrix = |rng: &mut Rng| -> Vec<f32> {
            let m = rng.vec(blocks * b * b);
            match gates_storage {
                Storage::F32 => m,
                Storage::Bf16 => m.iter().map(|v| bf16_value(bf16_bits(*v))).collect(),
            }
        };
        let gates = vec![matrix(rng), rng.vec(c), matrix(rng), rng.vec(c)];
        // softplus of a parameter: positive, small and large decays both.
        let decay: Vec<f32> = rng.vec(c).iter().map(|v| (v * 3.0).exp().ln_1p()).collect();
        let window = vec![0.0f32; (k - 1) * c];
        let state = vec![0.0f32; c];
        let mut device = vec![
            mem.alloc_f32(&vec![0.0; k * c]),
            mem.alloc_f32(&conv_w),
            mem.alloc_f32(&conv_b),
        ];
        for (i, g) in gates.iter().enumerate() {
            device.push(if i % 2 == 0 && gates_storage == Storage::Bf16 {
                let bytes: Vec<u8> = g.iter().flat_map(|v| bf16_bits(*v).to_le_bytes()).collect();
                mem.alloc(&bytes)
            } else {
                mem.alloc_f32(g)
            });
        }
        device.push(mem.alloc_f32(&decay));
        device.push(mem.alloc_f32(&state));
        RgLruCase {
            c,
            blocks,
            k,
            conv_w,
            conv_b,
            gates,
            decay,
            window,
            state,
            device,
        }
    }

    /// The kernels' parameters from the window on: window, conv w, conv b, gates, decay,
    /// state.
    fn params(&self) -> &[u64] {
        &self.device
    }

    /// One reference step at `pos`, updating the host window and state.
    fn reference_step(&mut self, pos: i32, x: &[f32], y: &[f32]) -> Vec<f32> {
        rg_lru_reference(
            self.c,
            self.blocks,
            self.k,
            pos,
            x,
            &mut self.window,
            &self.conv_w,
            &self.conv_b,
            [
                &self.gates[0],
                &self.gates[1],
                &self.gates[2],
                &self.gates[3],
            ],
            &self.decay,
            &mut self.state,
            y,
        )
    }

    /// Window and state in the interpreter's memory equal the reference's before position
    /// `next` (the state within `bound`): the reference shifts its K-1 rows, the kernels keep a ring of K rows where the
    /// input at position p sits in row p mod K.
    fn check_carried(&self, mem: &Memory, next: usize, bound: f32) {
        let (window_at, state_at, c, k) = (self.device[0], self.device[8], self.c, self.k);
        let state = mem.read_f32(state_at, c).unwrap();
        let d = max_diff(&state, &self.state);
        assert!(d < bound, "state before {next}: max |diff| {d}");
        let ring = mem.read_f32(window_at, k * c).unwrap();
        for r in 0..k - 1 {
            let Some(p) = (next + r).checked_sub(k - 1) else {
                continue;
            };
            let row = &ring[(p % k) * c..(p % k + 1) * c];
            assert_eq!(
                row,
                &self.window[r * c..(r + 1) * c],
                "input of {p} before {next}"
            );
        }
    }
}

#[test]
fn rg_lru_step_matches_reference_over_several_tokens() {
    use griffin_backend_ptx::rg_lru::{step_columns, step_grid, Storage};
    // Gate blocks of 16 channels (one thread block each), of 80 (five blocks of 16 columns
    // each, five rows per thread, their weights loaded before the convolution) and of 12
    // (rows that do not split evenly over the row groups: the loop, and threads without
    // rows).
    // The middle case keeps its gate matrices in bf16.
    for (c, blocks, grid, gates) in [
        (64, 4, 4, Storage::F32),
        (160, 2, 10, Storage::Bf16),
        (24, 2, 2, Storage::F32),
    ] {
        let spec = rg_lru_step_case(c, blocks, gates);
        assert_eq!(step_grid(&spec), grid, "{c} channels in {blocks} blocks");
        assert_eq!(step_columns(&spec), if c == 24 { 12 } else { 16 });
    }
}

fn rg_lru_step_case(
    c: usize,
    blocks: usize,
    gates: griffin_backend_ptx::rg_lru::Storage,
) -> griffin_backend_ptx::rg_lru::RgLruSpec {
    use griffin_backend_ptx::rg_lru::{rg_lru_step, step_block, step_grid, RgLruSpec, Storage};
    let k = 4usize;
    let spec = RgLruSpec {
        name: "rg_lru".into(),
        channels: c as u32,
        blocks: blocks as u32,
        width: k as u32,
        conv: Storage::F32,
        gates,
        gate_output: true,
    };
    let m = Module::parse(&module(&[rg_lru_step(&spec)])).unwrap();
    let mut rng = Rng(42);
    let mut mem = Memory::new();
    let mut case = RgLruCase::new(&mut rng, &mut mem, c, blocks, k, gates);
    let out_a = mem.alloc_f32(&vec![0.0; c]);
    let mut worst = 0.0f32;
    // Positions 0.. cover the start-of-text reset, taps before the start, and the ring's
    // rows reused twice.
    for pos in 0..10 {
        let x = rng.vec(c);
        let y = rng.vec(c);
        let (x_a, y_a) = (mem.alloc_f32(&x), mem.alloc_f32(&y));
        let pos_a = mem.alloc_u32(&[pos as u32]);
        let mut params = vec![x_a, pos_a];
        params.extend_from_slice(case.params());
        params.extend([y_a, out_a]);
        run(
            &m,
            "rg_lru",
            &Launch {
                grid: step_grid(&spec),
                block: step_block(&spec),
                params: &params,
            },
            &mut mem,
        )
        .unwrap();
        let want = case.reference_step(pos, &x, &y);
        let got = mem.read_f32(out_a, c).unwrap();
        worst = worst.max(max_diff(&got, &want));
        case.check_carried(&mem, pos as usize + 1, 1e-5);
    }
    assert!(worst < 1e-5, "{c} channels: max |diff| {worst}");
    spec
}

/// Rotate-half rotary embedding of one row at position p, in f64.
/// One query's attention output in f64: scores `q·k · 0.25` over `keys_values` (rotated key
/// rows and value rows of every KV head, KV head `g` used), softmax, weighted values.
fn attention_reference(
    q: &[f64],
    keys_values: &[(Vec<f64>, Vec<f32>)],
    g: usize,
    hd: usize,
) -> Vec<f64> {
    let scores: Vec<f64> = keys_values
        .iter()
        .map(|(kr, _)| (0..hd).map(|d| q[d] * kr[g * hd + d]).sum::<f64>() * 0.25)
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let total: f64 = e.iter().sum();
    (0..hd)
        .map(|d| {
            keys_values
                .iter()
                .zip(&e)
                .map(|((_, vv), w)| w * vv[g * hd + d] as f64)
                .sum::<f64>()
                / total
        })
        .collect()
}

fn rotate(row: &[f32], p: usize, theta: f64, dims: usize) -> Vec<f64> {
    let mut out: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    let half = dims / 2;
    for i in 0..half {
        let angle = p as f64 * theta.powf(-(2.0 * i as f64) / dims as f64);
        let (a, b) = (row[i] as f64, row[i + half] as f64);
        out[i] = a * angle.cos() - b * angle.sin();
        out[i + half] = b * angle.cos() + a * angle.sin();
    }
    out
}

#[test]
fn attention_step_matches_reference_across_the_ring() {
    // A window within one split of keys; and one of 80 positions in three splits (the last
    // partly filled), head width 40 (features past the warp's width), three query heads per
    // KV head; each far enough to wrap the ring twice.
    attention_step_case(4, 2, 16, 8, 19);
    attention_step_case(3, 1, 40, 80, 170);
    // Heads wider than the block's 256 threads: values loaded per feature after the softmax.
    attention_step_case(2, 1, 264, 40, 45);
}

fn attention_step_case(heads: usize, kv_heads: usize, hd: usize, window: usize, steps: usize) {
    use griffin_backend_ptx::attention::{
        attend, attend_combine, attend_combine_grid, attend_grid, attend_scratch,
        inverse_frequencies, AttentionSpec, ATTEND_WARPS, COMBINE_BLOCK,
    };
    let (theta, dims) = (10000.0, 8u32);
    let spec = AttentionSpec {
        name: "attn".into(),
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        head_dim: hd as u32,
        window: window as u32,
        scale: 0.25,
        rotary: Some((theta, dims)),
    };
    let m = Module::parse(&module(&[attend(&spec), attend_combine(&spec)])).unwrap();
    let mut rng = Rng(7);
    let mut mem = Memory::new();
    let inv = inverse_frequencies(theta, dims);
    let inv_a = mem.alloc(
        &inv.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let ring = window * kv_heads * hd;
    let keys_a = mem.alloc_f32(&vec![0.0; ring]);
    let values_a = mem.alloc_f32(&vec![0.0; ring]);
    let out_a = mem.alloc_f32(&vec![0.0; heads * hd]);
    let (o_elems, ml_elems) = attend_scratch(&spec);
    let o_part = mem.alloc_f32(&vec![f32::NAN; o_elems as usize]);
    let ml_part = mem.alloc_f32(&vec![f32::NAN; ml_elems as usize]);
    // Every token's rotated key and value, to attend over in the reference.
    let mut past: Vec<(Vec<f64>, Vec<f32>)> = Vec::new();
    let mut worst = 0.0f32;
    // Far enough to wrap the ring twice; then a jump to a large position (angle reduction).
    let positions: Vec<usize> = (0..steps).chain([100_000, 100_001]).collect();
    for &p in &positions {
        let (q, k, v) = (
            rng.vec(heads * hd),
            rng.vec(kv_heads * hd),
            rng.vec(kv_heads * hd),
        );
        let (qa, ka, va) = (mem.alloc_f32(&q), mem.alloc_f32(&k), mem.alloc_f32(&v));
        let pa = mem.alloc_u32(&[p as u32]);
        run(
            &m,
            "attn_attend",
            &Launch {
                grid: attend_grid(&spec),
                block: 32 * ATTEND_WARPS,
                params: &[qa, ka, va, pa, inv_a, keys_a, values_a, o_part, ml_part],
            },
            &mut mem,
        )
        .unwrap();
        run(
            &m,
            "attn_combine",
            &Launch {
                grid: attend_combine_grid(&spec),
                block: COMBINE_BLOCK,
                params: &[pa, o_part, ml_part, out_a],
            },
            &mut mem,
        )
        .unwrap();
        if p == 100_000 {
            // The reference's window after a jump holds only positions it has seen; the
            // kernel's ring still holds old slots, which count as positions p-W+1..p. Compare
            // the ring's new key and value rows only (the rotation at a large angle), then
            // restart the reference history at this position.
            past.clear();
        }
        let krows: Vec<Vec<f64>> = (0..kv_heads)
            .map(|g| rotate(&k[g * hd..(g + 1) * hd], p, theta, dims as usize))
            .collect();
        past.push((krows.concat(), v.clone()));
        // The ring's row for this position: the rotated key, the value as it came.
        let row = (p % window) * kv_heads * hd;
        let ring_k = mem
            .read_f32(keys_a + 4 * row as u64, kv_heads * hd)
            .unwrap();
        let ring_v = mem
            .read_f32(values_a + 4 * row as u64, kv_heads * hd)
            .unwrap();
        for (i, want) in krows.concat().iter().enumerate() {
            worst = worst.max(gap(ring_k[i], *want as f32));
            assert_eq!(ring_v[i], v[i], "value {i} at position {p}");
        }
        if p >= 100_000 {
            continue;
        }
        let got = mem.read_f32(out_a, heads * hd).unwrap();
        let lo = past.len().saturating_sub(window);
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let want_q = rotate(&q[h * hd..(h + 1) * hd], p, theta, dims as usize);
            let want = attention_reference(&want_q, &past[lo..], g, hd);
            for (d, o) in want.iter().enumerate() {
                worst = worst.max(gap(got[h * hd + d], *o as f32));
            }
        }
    }
    assert!(worst < 2e-5, "window {window}: max |diff| {worst}");
}

#[test]
fn gather_scales_the_row_of_the_id() {
    use griffin_backend_ptx::misc::{gather, GATHER_BLOCK};
    use griffin_backend_ptx::rg_lru::Storage;
    let (vocab, width) = (50usize, 300usize);
    let mut rng = Rng(3);
    let table: Vec<u16> = rng
        .vec(vocab * width)
        .iter()
        .map(|v| bf16_bits(*v))
        .collect();
    let m = Module::parse(&module(&[gather(
        "g",
        width as u32,
        Storage::Bf16,
        Some(8.0),
    )]))
    .unwrap();
    let mut mem = Memory::new();
    let ta = mem.alloc(
        &table
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let ia = mem.alloc_u32(&[37]);
    let oa = mem.alloc_f32(&vec![0.0; width]);
    run(
        &m,
        "g",
        &Launch {
            grid: (width as u32).div_ceil(GATHER_BLOCK),
            block: GATHER_BLOCK,
            params: &[ta, ia, oa],
        },
        &mut mem,
    )
    .unwrap();
    let want: Vec<f32> = (0..width)
        .map(|c| bf16_value(table[37 * width + c]) * 8.0)
        .collect();
    assert_eq!(mem.read_f32(oa, width).unwrap(), want);
}

#[test]
fn argmax_takes_the_first_maximum_and_skips_nan() {
    use griffin_backend_ptx::misc::{argmax, ARGMAX_THREADS};
    // 5000: groups of four one at a time; 17003: rounds of four groups per thread, single
    // groups, and three logits past the last group.
    for vocab in [5000usize, 17003] {
        let m = Module::parse(&module(&[argmax("a", vocab as u32)])).unwrap();
        let mut rng = Rng(11);
        let mut cases: Vec<(Vec<f32>, u32)> = vec![
            {
                let mut v = rng.vec(vocab);
                v[4321] = 7.0;
                (v, 4321)
            },
            {
                // Ties: the lowest index wins, whichever thread saw it.
                let mut v = rng.vec(vocab);
                v[2049] = 9.0;
                v[17] = 9.0;
                v[4999] = 9.0;
                (v, 17)
            },
            {
                let mut v = rng.vec(vocab);
                v[0] = f32::NAN;
                v[3] = 5.0;
                (v, 3)
            },
            (vec![f32::NAN; vocab], 0),
        ];
        if vocab % 4 != 0 {
            // The maximum past the last group of four; then tied with one inside a group.
            let mut v = rng.vec(vocab);
            v[vocab - 1] = 6.0;
            cases.push((v.clone(), vocab as u32 - 1));
            v[16_000] = 6.0;
            cases.push((v, 16_000));
        }
        for (logits, want) in cases {
            let mut mem = Memory::new();
            let la = mem.alloc_f32(&logits);
            let oa = mem.alloc_u32(&[u32::MAX]);
            run(
                &m,
                "a",
                &Launch {
                    grid: 1,
                    block: ARGMAX_THREADS,
                    params: &[la, oa],
                },
                &mut mem,
            )
            .unwrap();
            assert_eq!(mem.read_u32(oa, 1).unwrap()[0], want, "vocab {vocab}");
        }
    }
}

#[test]
fn projection_best_pairs_give_the_argmax_of_its_outputs() {
    use griffin_backend_ptx::gemv::{best_slots, gemv_with_best};
    use griffin_backend_ptx::misc::{argmax_best, ARGMAX_THREADS};
    use griffin_backend_ptx::rg_lru::Storage;
    // 9000 outputs: the fixed grid of 528 blocks, warps walking two or three rows each; 300:
    // a warp per row, some warps without one.
    for width in [9000usize, 300] {
        let spec = GemvSpec {
            name: "p".into(),
            inputs: 8,
            width: width as u32,
            bias: false,
            epilogue: Epilogue::None,
            residual: false,
            weights: Storage::F32,
            norm: None,
        };
        let slots = best_slots(spec.width);
        let m = Module::parse(&module(&[
            gemv_with_best(&spec),
            argmax_best("a", slots, width as u32),
        ]))
        .unwrap();
        let mut rng = Rng(3);
        let mut cases: Vec<(Vec<f32>, u32)> = Vec::new();
        let mut v = rng.vec(width);
        v[width / 3] = 7.0;
        cases.push((v, width as u32 / 3));
        // Ties across warps and rows of one warp: the lowest index wins.
        let mut v = rng.vec(width);
        for i in [width - 1, 4224 % width, 17, width / 2] {
            v[i] = 9.0;
        }
        cases.push((v, 17));
        let mut v = rng.vec(width);
        v[0] = f32::NAN;
        v[3] = 5.0;
        cases.push((v, 3));
        cases.push((vec![f32::NAN; width], 0));
        cases.push((vec![f32::NEG_INFINITY; width], 0));
        for (outputs, want) in cases {
            // x = e_0, so output r is w[r][0].
            let mut w = vec![0.0f32; 8 * width];
            for (r, o) in outputs.iter().enumerate() {
                w[8 * r] = *o;
            }
            let mut mem = Memory::new();
            let x = mem.alloc_f32(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
            let wa = mem.alloc_f32(&w);
            let out = mem.alloc_f32(&vec![0.0; width]);
            let best = mem.alloc(&vec![0xAB; 8 * slots as usize]);
            let next = mem.alloc_u32(&[u32::MAX]);
            let launch = Launch {
                grid: grid(&spec),
                block: 32 * WARPS_PER_BLOCK,
                params: &[x, wa, out, best],
            };
            run(&m, "p", &launch, &mut mem).unwrap();
            let got = mem.read_f32(out, width).unwrap();
            let same = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan());
            assert!(got.iter().zip(&outputs).all(|(g, o)| same(*g, *o)));
            let launch = Launch {
                grid: 1,
                block: ARGMAX_THREADS,
                params: &[best, next],
            };
            run(&m, "a", &launch, &mut mem).unwrap();
            assert_eq!(mem.read_u32(next, 1).unwrap()[0], want, "width {width}");
        }
    }
}

/// The norm's row scales: per token the smallest 2^k (k ≥ 0) that brings every normalised
/// value below 2^15, rows of gains from 1 to 1e9 (so k from 0 to ~20); the normalised rows are
/// those of the norm without scales, bit for bit; `row_scales_tokens` finds the same scales
/// in the normalised rows.
#[test]
fn norm_row_scales_are_the_smallest_powers_of_two_that_fit_f16() {
    use griffin_backend_ptx::prefill::{rms_norm_tokens, row_scales_tokens, NORM_BLOCK};
    let mut rng = Rng(7);
    let (tokens, n) = (12usize, 300u32);
    // Gains growing along the row to 1e9; even tokens have nothing past the first third
    // (gains up to 1e3: normalised values below 2^15, no scaling), odd ones reach the end.
    let mut x = rng.vec(tokens * n as usize);
    for (t, row) in x.chunks_mut(n as usize).enumerate() {
        if t % 2 == 0 {
            row[n as usize / 3..].fill(0.0);
        }
    }
    let gain: Vec<f32> = (0..n)
        .map(|i| 10f32.powf(9.0 * i as f32 / n as f32))
        .collect();
    let m = Module::parse(&module(&[
        rms_norm_tokens("plain", n, 1e-6, false),
        rms_norm_tokens("scaled", n, 1e-6, true),
        row_scales_tokens("rows", n),
    ]))
    .unwrap();
    let mut mem = Memory::new();
    let ca = mem.alloc_u32(&[tokens as u32]);
    let xa = mem.alloc_f32(&x);
    let ga = mem.alloc_f32(&gain);
    let (plain, scaled) = (
        mem.alloc_f32(&vec![0.0; tokens * n as usize]),
        mem.alloc_f32(&vec![0.0; tokens * n as usize]),
    );
    let sa = mem.alloc_f32(&vec![f32::NAN; tokens]);
    for (name, params) in [
        ("plain", vec![ca, xa, ga, plain]),
        ("scaled", vec![ca, xa, ga, scaled, sa]),
    ] {
        let launch = Launch {
            grid: 5,
            block: NORM_BLOCK,
            params: &params,
        };
        run(&m, name, &launch, &mut mem).unwrap();
    }
    let (p, q) = (
        mem.read_f32(plain, tokens * n as usize).unwrap(),
        mem.read_f32(scaled, tokens * n as usize).unwrap(),
    );
    assert!(p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()));
    let scales = mem.read_f32(sa, tokens).unwrap();
    // The same scales from the normalised rows by the kernel for rows no norm wrote.
    let ra = mem.alloc_f32(&vec![f32::NAN; tokens]);
    let launch = Launch {
        grid: 5,
        block: NORM_BLOCK,
        params: &[ca, scaled, ra],
    };
    run(&m, "rows", &launch, &mut mem).unwrap();
    assert_eq!(mem.read_f32(ra, tokens).unwrap(), scales);
    let mut ks = Vec::new();
    for (t, &s) in scales.iter().enumerate() {
        let biggest = p[t * n as usize..(t + 1) * n as usize]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let k = s.log2();
        assert!(k >= 0.0 && k.fract() == 0.0, "token {t}: scale {s}");
        assert!(biggest / s < 32768.0, "token {t}: {biggest} / {s}");
        assert!(
            k == 0.0 || biggest / s >= 16384.0,
            "token {t}: {biggest} / {s}, not the smallest"
        );
        ks.push(k as u32);
    }
    assert!(ks.iter().step_by(2).all(|&k| k == 0), "{ks:?}");
    assert!(ks.iter().skip(1).step_by(2).all(|&k| k > 10), "{ks:?}");
}

#[test]
fn prefill_projection_and_norm_over_a_chunk_of_tokens() {
    use griffin_backend_ptx::prefill::{gemm_tokens, rms_norm_tokens, NORM_BLOCK};
    use griffin_backend_ptx::rg_lru::Storage;
    let mut rng = Rng(99);
    // 10 tokens: one full group of 8 and a tail of 2; the plan is sized for 16.
    let (tokens, max_tokens) = (10usize, 16usize);
    let cases = [
        (
            "t_plain",
            72u32,
            20u32,
            true,
            Epilogue::None,
            true,
            Storage::Bf16,
        ),
        (
            "t_geglu",
            64,
            12,
            true,
            Epilogue::GeGlu,
            false,
            Storage::F32,
        ),
        (
            "t_softcap",
            48,
            30,
            false,
            Epilogue::SoftCap(30.0),
            false,
            Storage::Bf16,
        ),
    ];
    for (name, inputs, width, bias, epilogue, residual, storage) in cases {
        let case = ProjectionCase::new(&mut rng, max_tokens, inputs, width, epilogue);
        let (n, w, x) = (case.n, case.w, &case.x);
        let gain: Vec<f32> = rng.vec(n).iter().map(|v| 1.0 + v).collect();
        let spec = GemvSpec {
            name: name.into(),
            inputs,
            width,
            bias,
            epilogue,
            residual,
            norm: None,
            weights: storage,
        };
        let m = Module::parse(&module(&[
            gemm_tokens(&spec),
            rms_norm_tokens("norm", inputs, 1e-6, false),
        ]))
        .unwrap();
        let mut mem = Memory::new();
        let ca = mem.alloc_u32(&[tokens as u32]);
        let xa = mem.alloc_f32(x);
        let ga = mem.alloc_f32(&gain);
        let xn = mem.alloc_f32(&vec![0.0; max_tokens * n]);
        let wa = mem.alloc(&case.weights(storage));
        let ba = mem.alloc_f32(&case.b);
        let ra = mem.alloc_f32(&case.r);
        let oa = mem.alloc_f32(&vec![f32::NAN; max_tokens * w]);
        // Normalise the chunk, then project the normalised rows.
        run(
            &m,
            "norm",
            &Launch {
                // Fewer blocks than tokens: each normalises every third token from its own.
                grid: 3,
                block: NORM_BLOCK,
                params: &[ca, xa, ga, xn],
            },
            &mut mem,
        )
        .unwrap();
        let mut params = vec![ca, xn, wa];
        if bias {
            params.push(ba);
        }
        if residual {
            params.push(ra);
        }
        params.push(oa);
        run(
            &m,
            name,
            &Launch {
                grid: grid(&spec),
                block: 32 * WARPS_PER_BLOCK,
                params: &params,
            },
            &mut mem,
        )
        .unwrap();
        let got = mem.read_f32(oa, max_tokens * w).unwrap();
        let mut worst = 0.0f32;
        for t in 0..tokens {
            let row = &x[t * n..(t + 1) * n];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for c in 0..w {
                let v = case.want(t, c, bias, residual, |i| {
                    row[i] as f64 * inv * gain[i] as f64
                });
                worst = worst.max(gap(got[t * w + c], v as f32));
            }
        }
        assert!(worst < 1e-4, "{name}: max |diff| {worst}");
        // Rows past the count are left alone.
        assert!(
            got[tokens * w..].iter().all(|v| v.is_nan()),
            "{name}: wrote past the count"
        );
    }
}

#[test]
fn prefill_rg_lru_over_chunks_equals_token_by_token_steps() {
    // 48 channels: the scan's second block of 32 lanes has 16 past the last channel.
    rg_lru_chunks_case(48, 2, false, 1e-5);
}

/// bf16 gate blocks of 64 and 256 channels: the conv alone, then both gates as one
/// block-diagonal product on tensor cores (inputs split in two bf16 halves, so ~16 bits of
/// each: a looser bound than the CUDA-core path's f32 products).
#[test]
fn prefill_rg_lru_with_gates_on_tensor_cores_equals_token_by_token_steps() {
    rg_lru_chunks_case(128, 2, true, 1e-4);
    rg_lru_chunks_case(256, 1, true, 1e-4);
}

fn rg_lru_chunks_case(c: usize, blocks: usize, tensor_cores: bool, bound: f32) {
    use griffin_backend_ptx::prefill::{
        elementwise_grid, rg_lru_conv_tokens, rg_lru_gates_grid, rg_lru_gates_tokens,
        rg_lru_scan_grid, rg_lru_scan_tokens, NORM_BLOCK, SCAN_BLOCK,
    };
    use griffin_backend_ptx::rg_lru::{block_size, RgLruSpec, Storage};
    use griffin_backend_ptx::tc::{
        gates_fit_tensor_cores, gates_tc_grid, gates_tc_token_warps, rg_lru_gates_tc, tc_block,
        TcInputs,
    };
    let k = 4usize;
    let spec = RgLruSpec {
        name: "scan".into(),
        channels: c as u32,
        blocks: blocks as u32,
        width: k as u32,
        conv: Storage::F32,
        // Gate matrices in bf16 (the decode test covers f32 too).
        gates: Storage::Bf16,
        gate_output: true,
    };
    let named = |name: &str| RgLruSpec {
        name: name.into(),
        ..spec.clone()
    };
    assert_eq!(gates_fit_tensor_cores(&spec), tensor_cores);
    let max_tokens = 300;
    let warps = gates_tc_token_warps(&spec, max_tokens as u32);
    let mut kernels = vec![
        rg_lru_gates_tokens(&named("gates")),
        rg_lru_scan_tokens(&spec),
    ];
    if tensor_cores {
        kernels.push(rg_lru_conv_tokens(&named("conv")));
        kernels.push(rg_lru_gates_tc(&named("gates_tc"), TcInputs::Split, warps));
    }
    let m = Module::parse(&module(&kernels)).unwrap();
    let mut rng = Rng(5);
    let mut mem = Memory::new();
    let mut case = RgLruCase::new(&mut rng, &mut mem, c, blocks, k, Storage::Bf16);
    let out_a = mem.alloc_f32(&vec![0.0; max_tokens * c]);
    let conv_a = mem.alloc_f32(&vec![0.0; max_tokens * c]);
    let a_a = mem.alloc_f32(&vec![0.0; max_tokens * c]);
    let b_a = mem.alloc_f32(&vec![0.0; max_tokens * c]);
    let mut worst = 0.0f32;
    let mut pos = 0usize;
    // Chunks of 5, 2 (shorter than the window), 37 (three gate groups; scan segments of 3, the
    // last of one), 40 (segments of 3, three left empty), 300 (segments of 19: an unrolled
    // step of 16 and three single ones) and 1 token, from the start of the text.
    for chunk in [5usize, 2, 37, 40, 300, 1] {
        let x = rng.vec(chunk * c);
        let y = rng.vec(chunk * c);
        let (x_a, y_a) = (mem.alloc_f32(&x), mem.alloc_f32(&y));
        let n_a = mem.alloc_u32(&[chunk as u32]);
        let p_a = mem.alloc_u32(&[pos as u32]);
        // window, conv w and b, input gate w and b, recurrent gate w and b, decay, state.
        let carried = case.params();
        if tensor_cores {
            let mut params = vec![n_a, x_a, p_a];
            params.extend_from_slice(&carried[..3]);
            params.push(conv_a);
            let launch = Launch {
                grid: elementwise_grid((max_tokens * c) as u32, NORM_BLOCK),
                block: NORM_BLOCK,
                params: &params,
            };
            run(&m, "conv", &launch, &mut mem).unwrap();
            let mut params = vec![n_a, conv_a, p_a];
            params.extend_from_slice(&carried[3..carried.len() - 1]);
            params.extend([a_a, b_a]);
            let launch = Launch {
                grid: gates_tc_grid(&spec, max_tokens as u32, warps),
                block: tc_block(warps),
                params: &params,
            };
            run(&m, "gates_tc", &launch, &mut mem).unwrap();
        } else {
            // Gates: window, conv, gates and decay (not the state), then the coefficients.
            let mut params = vec![n_a, x_a, p_a];
            params.extend_from_slice(&carried[..carried.len() - 1]);
            params.extend([a_a, b_a]);
            let launch = Launch {
                grid: rg_lru_gates_grid(&spec, max_tokens as u32),
                block: block_size(&spec),
                params: &params,
            };
            run(&m, "gates", &launch, &mut mem).unwrap();
        }
        let (window_a, state_a) = (carried[0], carried[carried.len() - 1]);
        let params = vec![n_a, x_a, p_a, window_a, state_a, a_a, b_a, y_a, out_a];
        let launch = Launch {
            grid: rg_lru_scan_grid(&spec),
            block: SCAN_BLOCK,
            params: &params,
        };
        run(&m, "scan", &launch, &mut mem).unwrap();
        let got = mem.read_f32(out_a, chunk * c).unwrap();
        for t in 0..chunk {
            let want = case.reference_step(
                (pos + t) as i32,
                &x[t * c..(t + 1) * c],
                &y[t * c..(t + 1) * c],
            );
            worst = worst.max(max_diff(&got[t * c..(t + 1) * c], &want));
        }
        pos += chunk;
        case.check_carried(&mem, pos, bound);
    }
    assert!(worst < bound, "{c} channels: max |diff| {worst}");
}

#[test]
fn prefill_attention_over_chunks_equals_the_reference() {
    // Head widths below a warp and across two (features per lane: one, or two with the second
    // only for some lanes); query heads per KV head: 2, and 3 in one group. A window of 8 in
    // chunks of 5, 3, 10 (longer than the window) and 1; a window of 40 (key tiles of 32 and
    // 8, tiles spanning ring and chunk, the ring wrapping) in chunks of 30, 45, 50 and 1.
    // Head width 128: the value rows by 16-byte quads per lane.
    for (heads, kv_heads, hd) in [(4, 2, 16), (3, 1, 40), (2, 1, 128)] {
        prefill_attention_case(heads, kv_heads, hd, 8, &[5, 3, 10, 1], false);
        prefill_attention_case(heads, kv_heads, hd, 40, &[30, 45, 50, 1], false);
    }
}

/// The same on tensor cores (`attend_tokens_tc`): head widths that are multiples of 16; 9
/// query heads per KV head take two blocks of 5 warps, the last warp's head past the group.
/// Windows of 8 (inside one 16-key tile) and 40 (tiles spanning ring and chunk, the ring
/// wrapping), blocks of 16 tokens with chunks shorter and longer than one.
#[test]
fn prefill_attention_on_tensor_cores_equals_the_reference() {
    for (heads, kv_heads, hd) in [(4, 2, 16), (9, 1, 32), (2, 1, 128)] {
        prefill_attention_case(heads, kv_heads, hd, 8, &[5, 3, 10, 1], true);
        prefill_attention_case(heads, kv_heads, hd, 40, &[30, 45, 50, 1], true);
    }
}

fn prefill_attention_case(
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: usize,
    chunks: &[usize],
    tensor_cores: bool,
) {
    use griffin_backend_ptx::attention::{
        attend_tokens, attend_tokens_block, attend_tokens_grid, inverse_frequencies, rotate_tokens,
        rotate_tokens_threads, write_ring_tokens, AttentionSpec, ROTATE_BLOCK,
    };
    use griffin_backend_ptx::attention_tc::{
        attend_tokens_tc, attend_tokens_tc_block, attend_tokens_tc_grid, attend_tokens_tc_scratch,
        kv_split_bytes, kv_split_threads, kv_split_tokens,
    };
    use griffin_backend_ptx::prefill::NORM_BLOCK;
    use griffin_backend_ptx::tc::TcInputs;
    let (theta, dims) = (10000.0, 8u32);
    let max_tokens = *chunks.iter().max().unwrap() as u32;
    let spec = AttentionSpec {
        name: "pa".into(),
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        head_dim: hd as u32,
        window: window as u32,
        scale: 0.25,
        rotary: Some((theta, dims)),
    };
    let (attend, attend_name, attend_grid, attend_block) = if tensor_cores {
        (
            attend_tokens_tc(&spec, TcInputs::Split, max_tokens),
            "pa_attend_tokens_tc",
            attend_tokens_tc_grid(&spec, max_tokens),
            attend_tokens_tc_block(&spec),
        )
    } else {
        (
            attend_tokens(&spec),
            "pa_attend_tokens",
            attend_tokens_grid(&spec, max_tokens),
            attend_tokens_block(&spec),
        )
    };
    let attend_params = if tensor_cores { 10 } else { 8 };
    let m = Module::parse(&module(&[
        rotate_tokens(&spec, max_tokens),
        kv_split_tokens(&spec, TcInputs::Split, max_tokens),
        attend,
        write_ring_tokens(&spec, max_tokens),
    ]))
    .unwrap();
    let mut rng = Rng(17);
    let mut mem = Memory::new();
    // The tensor-core kernel's query scratch and key/value planes, as pooled buffers would
    // be: NaN.
    let scratch_a = mem.alloc(&vec![
        0xFF;
        attend_tokens_tc_scratch(&spec, max_tokens) as usize
    ]);
    let planes_a = mem.alloc(&vec![0xFF; kv_split_bytes(&spec, max_tokens) as usize]);
    let inv = inverse_frequencies(theta, dims);
    let inv_a = mem.alloc(
        &inv.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let ring = window * kv_heads * hd;
    let keys_a = mem.alloc_f32(&vec![0.0; ring]);
    let values_a = mem.alloc_f32(&vec![0.0; ring]);
    let mt = max_tokens as usize;
    let qr_a = mem.alloc_f32(&vec![0.0; mt * heads * hd]);
    let kr_a = mem.alloc_f32(&vec![0.0; mt * kv_heads * hd]);
    let out_a = mem.alloc_f32(&vec![0.0; mt * heads * hd]);
    let mut past: Vec<(Vec<f64>, Vec<f32>)> = Vec::new();
    let mut worst = 0.0f32;
    let mut pos = 0usize;
    for &chunk in chunks {
        let q = rng.vec(chunk * heads * hd);
        let k = rng.vec(chunk * kv_heads * hd);
        let v = rng.vec(chunk * kv_heads * hd);
        let (qa, ka, va) = (mem.alloc_f32(&q), mem.alloc_f32(&k), mem.alloc_f32(&v));
        let n_a = mem.alloc_u32(&[chunk as u32]);
        let s_a = mem.alloc_u32(&[pos as u32]);
        let launch =
            |m: &Module, mem: &mut Memory, name: &str, grid: u32, block: u32, p: &[u64]| {
                run(
                    m,
                    name,
                    &Launch {
                        grid,
                        block,
                        params: p,
                    },
                    mem,
                )
                .unwrap();
            };
        // Fewer blocks than elements: each thread strides over the grid.
        let rot_grid = (rotate_tokens_threads(&spec, max_tokens).div_ceil(ROTATE_BLOCK)).min(3);
        launch(
            &m,
            &mut mem,
            "pa_rotate_tokens",
            rot_grid,
            ROTATE_BLOCK,
            &[n_a, s_a, qa, ka, inv_a, qr_a, kr_a],
        );
        if tensor_cores {
            // The keys and values the chunk sees, split once; fewer blocks than elements.
            let threads = kv_split_threads(&spec, max_tokens);
            launch(
                &m,
                &mut mem,
                "pa_kv_split_tokens",
                threads.div_ceil(NORM_BLOCK).min(3),
                NORM_BLOCK,
                &[n_a, s_a, kr_a, va, keys_a, values_a, planes_a],
            );
        }
        launch(
            &m,
            &mut mem,
            attend_name,
            attend_grid,
            attend_block,
            &[
                qr_a, n_a, s_a, kr_a, va, keys_a, values_a, out_a, scratch_a, planes_a,
            ][..attend_params],
        );
        let ring_grid = ((max_tokens * (kv_heads * hd) as u32).div_ceil(ROTATE_BLOCK)).min(2);
        launch(
            &m,
            &mut mem,
            "pa_write_ring_tokens",
            ring_grid,
            ROTATE_BLOCK,
            &[n_a, s_a, kr_a, va, keys_a, values_a],
        );
        let got = mem.read_f32(out_a, chunk * heads * hd).unwrap();
        for t in 0..chunk {
            let p = pos + t;
            let krow = |g: usize| &k[(t * kv_heads + g) * hd..(t * kv_heads + g + 1) * hd];
            let rotated: Vec<f64> = (0..kv_heads)
                .flat_map(|g| rotate(krow(g), p, theta, dims as usize))
                .collect();
            past.push((
                rotated,
                v[t * kv_heads * hd..(t + 1) * kv_heads * hd].to_vec(),
            ));
            let lo = past.len().saturating_sub(window);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qh = &q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                let want_q = rotate(qh, p, theta, dims as usize);
                let want = attention_reference(&want_q, &past[lo..], g, hd);
                for (d, o) in want.iter().enumerate() {
                    worst = worst.max(gap(got[(t * heads + h) * hd + d], *o as f32));
                }
            }
        }
        pos += chunk;
    }
    assert!(
        worst < 2e-5,
        "window {window}, hd {hd}, tensor cores {tensor_cores}: max |diff| {worst}"
    );
}

/// 20 tokens in a plan for 32: a full 16-token tile and a partial one, the second warp row
/// idle; 100 tokens in a plan for 128: one warp row full, the other partial.
#[test]
fn tensor_core_projection_over_a_chunk_equals_the_reference() {
    use griffin_backend_ptx::tc::TcInputs;
    // Blocks of one warp row (64 tokens) and of two (128).
    for rows in [1, 2] {
        tensor_core_projection_case(20, 32, TcInputs::Split, rows);
        tensor_core_projection_case(100, 128, TcInputs::Split, rows);
        // Several token groups in the grid, the last partial; then all but the first empty
        // (their blocks leave).
        tensor_core_projection_case(150, 256, TcInputs::Split, rows);
        tensor_core_projection_case(20, 256, TcInputs::Split, rows);
    }
    // Inputs rounded to bf16, or to f16 (the bf16 weights widened exactly): against a
    // reference that rounds them the same way.
    tensor_core_projection_case(100, 128, TcInputs::Bf16, 2);
    tensor_core_projection_case(100, 128, TcInputs::F16, 2);
    tensor_core_projection_case(20, 32, TcInputs::F16, 1);
}

/// The inputs in two parts (partial sums, then a reduction launch that finishes them): the
/// same results, for one and several token groups, blocks of one and two warp rows.
#[test]
fn tensor_core_projection_in_k_parts_equals_the_reference() {
    use griffin_backend_ptx::tc::TcInputs;
    for rows in [1, 2] {
        tensor_core_projection_k_split(20, 32, TcInputs::Split, rows, 2);
        tensor_core_projection_k_split(150, 256, TcInputs::Split, rows, 2);
    }
    tensor_core_projection_k_split(100, 128, TcInputs::F16, 2, 2);
}

fn tensor_core_projection_case(
    tokens: usize,
    max_tokens: u32,
    config: impl Into<griffin_backend_ptx::tc::TcConfig>,
    token_warps: u32,
) {
    tensor_core_projection_k_split(tokens, max_tokens, config, token_warps, 1);
}

/// f16 inputs with per-token scales (as `rms_norm_tokens` writes them for the projection after
/// a norm): rows up to ~2e6 in magnitude, far past f16's 65504, staged divided by their 2^k and
/// the sums multiplied back: within 1e-4 relative of the reference, whole and in k parts, on
/// `mma.sync` and `wgmma`. The same rows without scales overflow to infinity.
#[test]
fn row_scaled_f16_inputs_do_not_overflow() {
    use griffin_backend_ptx::tc::{TcConfig, TcInputs, TcMma};
    for mma in [TcMma::Sync, TcMma::Warpgroup] {
        let config = TcConfig {
            inputs: TcInputs::F16,
            mma,
            row_scales: true,
        };
        tensor_core_projection_case(100, 128, config, 2);
        tensor_core_projection_k_split(20, 32, config, 1, 2);
    }
    // Unscaled: a row of 1e5 becomes f16 infinity.
    use griffin_backend_ptx::rg_lru::Storage;
    use griffin_backend_ptx::tc::{gemm_tokens_tc, tc_block, tc_grid};
    let spec = GemvSpec {
        name: "p".into(),
        inputs: 32,
        width: 8,
        bias: false,
        epilogue: Epilogue::None,
        residual: false,
        norm: None,
        weights: Storage::Bf16,
    };
    let m = Module::parse(&module(&[gemm_tokens_tc(&spec, &[], TcInputs::F16, 1)])).unwrap();
    let mut mem = Memory::new();
    let params = [
        mem.alloc_u32(&[1]),
        mem.alloc_f32(&[1e5; 32]),
        mem.alloc(&[0x80u8, 0x3F].repeat(32 * 8)),
        mem.alloc_f32(&[0.0; 8]),
    ];
    let launch = Launch {
        grid: tc_grid(&spec, 1, 1),
        block: tc_block(1),
        params: &params,
    };
    run(&m, "p", &launch, &mut mem).unwrap();
    let out = mem.read_f32(params[3], 8).unwrap();
    assert!(out.iter().all(|v| !v.is_finite()), "{out:?}");
}

/// The projections on Hopper's warpgroup MMA (`wgmma.mma_async.m64n128k16`, weights through a
/// shared-memory descriptor): the same cases and bounds as `mma.sync`, whole and in k parts,
/// split and rounded inputs, blocks of one and two warpgroups.
#[test]
fn warpgroup_mma_projection_equals_the_reference() {
    use griffin_backend_ptx::tc::{TcConfig, TcInputs, TcMma};
    let wg = |inputs| TcConfig {
        inputs,
        mma: TcMma::Warpgroup,
        row_scales: false,
    };
    for rows in [1, 2] {
        tensor_core_projection_case(20, 32, wg(TcInputs::Split), rows);
        tensor_core_projection_case(150, 256, wg(TcInputs::Split), rows);
        tensor_core_projection_k_split(150, 256, wg(TcInputs::Split), rows, 2);
    }
    tensor_core_projection_case(100, 128, wg(TcInputs::Bf16), 2);
    tensor_core_projection_case(100, 128, wg(TcInputs::F16), 1);
}

/// With `k_split` > 1: partial sums over parts of the inputs, then the reduction that finishes
/// them (plain projections only: GeGLU and soft-cap cases are skipped).
fn tensor_core_projection_k_split(
    tokens: usize,
    max_tokens: u32,
    config: impl Into<griffin_backend_ptx::tc::TcConfig>,
    token_warps: u32,
    k_split: u32,
) {
    let config = config.into();
    let inputs_as = config.inputs;
    use griffin_backend_ptx::prefill::{elementwise_grid, NORM_BLOCK};
    use griffin_backend_ptx::rg_lru::Storage;
    use griffin_backend_ptx::tc::{
        gemm_reduce_tokens, gemm_tokens_tc, gemm_tokens_tc_partial, tc_block, tc_grid, TcInputs,
    };
    let mut rng = Rng(2024);
    // (name, inputs, width, bias, epilogue, residual, splits); widths that leave a warp's
    // column tiles partly past the end.
    type Case = (&'static str, u32, u32, bool, Epilogue, bool, Vec<u32>);
    let cases: [Case; 6] = [
        // Long enough rows (160 inputs) for the weight prefetch eight k-steps ahead.
        ("tc_long", 160, 40, true, Epilogue::None, false, vec![]),
        (
            "tc_geglu_partial",
            32,
            24,
            false,
            Epilogue::GeGlu,
            true,
            vec![],
        ),
        ("tc_plain", 64, 24, true, Epilogue::None, true, vec![]),
        ("tc_geglu", 48, 16, true, Epilogue::GeGlu, false, vec![]),
        (
            "tc_softcap",
            32,
            40,
            false,
            Epilogue::SoftCap(30.0),
            false,
            vec![],
        ),
        (
            "tc_split",
            32,
            32,
            true,
            Epilogue::None,
            false,
            vec![16, 8, 8],
        ),
    ];
    for (name, inputs, width, bias, epilogue, residual, splits) in cases {
        if k_split > 1 && epilogue != Epilogue::None {
            continue;
        }
        let mt = max_tokens as usize;
        let mut case = ProjectionCase::new(&mut rng, mt, inputs, width, epilogue);
        // With row scales: token t's inputs times 2^k, k from 0 to 20 (up to ~2e6, far past
        // f16's 65504), and its scale 2^k as `rms_norm_tokens` would write it.
        let scales: Vec<f32> = (0..mt)
            .map(|t| {
                if config.row_scales {
                    2f32.powi(((7 * t) % 21) as i32)
                } else {
                    1.0
                }
            })
            .collect();
        for (t, row) in case.x.chunks_mut(inputs as usize).enumerate() {
            row.iter_mut().for_each(|v| *v *= scales[t]);
        }
        let (n, w, x) = (case.n, case.w, &case.x);
        let spec = GemvSpec {
            name: name.into(),
            inputs,
            width,
            bias,
            epilogue,
            residual,
            norm: None,
            weights: Storage::Bf16,
        };
        let reduce = GemvSpec {
            name: format!("{name}_reduce"),
            ..spec.clone()
        };
        let m = Module::parse(&module(&[if k_split > 1 {
            gemm_tokens_tc_partial(&spec, config, token_warps, k_split, max_tokens)
                + &gemm_reduce_tokens(&reduce, &splits, k_split, max_tokens)
        } else {
            gemm_tokens_tc(&spec, &splits, config, token_warps)
        }]))
        .unwrap();
        let mut mem = Memory::new();
        let ca = mem.alloc_u32(&[tokens as u32]);
        let xa = mem.alloc_f32(x);
        let sa = mem.alloc_f32(&scales);
        let wa = mem.alloc(&case.weights(Storage::Bf16));
        let ba = mem.alloc_f32(&case.b);
        let ra = mem.alloc_f32(&case.r);
        let parts: Vec<usize> = if splits.is_empty() {
            vec![w]
        } else {
            splits.iter().map(|&p| p as usize).collect()
        };
        let outs: Vec<u64> = parts
            .iter()
            .map(|p| mem.alloc_f32(&vec![f32::NAN; mt * p]))
            .collect();
        let mut params = vec![ca, xa];
        if config.row_scales {
            params.push(sa);
        }
        params.push(wa);
        let mut finishing = Vec::new();
        if bias {
            finishing.push(ba);
        }
        if residual {
            finishing.push(ra);
        }
        finishing.extend(&outs);
        let grid = tc_grid(&spec, max_tokens, token_warps);
        if k_split > 1 {
            // Partial sums start as NaN: every one the reduction reads must be written.
            let partial = mem.alloc_f32(&vec![f32::NAN; k_split as usize * mt * w]);
            params.push(partial);
            let launch = Launch {
                grid: k_split * grid,
                block: tc_block(token_warps),
                params: &params,
            };
            run(&m, name, &launch, &mut mem).unwrap();
            let mut reduce_params = vec![ca, partial];
            reduce_params.extend(&finishing);
            let launch = Launch {
                grid: elementwise_grid(max_tokens * width, NORM_BLOCK),
                block: NORM_BLOCK,
                params: &reduce_params,
            };
            run(&m, &reduce.name, &launch, &mut mem).unwrap();
        } else {
            params.extend(&finishing);
            let launch = Launch {
                grid,
                block: tc_block(token_warps),
                params: &params,
            };
            run(&m, name, &launch, &mut mem).unwrap();
        }
        let got: Vec<Vec<f32>> = outs
            .iter()
            .zip(&parts)
            .map(|(&o, &p)| mem.read_f32(o, mt * p).unwrap())
            .collect();
        let mut worst = 0.0f32;
        for t in 0..tokens {
            let row = &x[t * n..(t + 1) * n];
            // The inputs as the kernel gives them to the MMAs (rounded to nearest even):
            // `hi + lo`, or `hi` alone. What is left is the f32 accumulation.
            let input = |i: usize| {
                // Staged as row / 2^k, the sums multiplied back by 2^k.
                let x = row[i] / scales[t];
                let hi = bf16_value(bf16_bits(x));
                scales[t] as f64
                    * match inputs_as {
                        TcInputs::Split => hi as f64 + bf16_value(bf16_bits(x - hi)) as f64,
                        TcInputs::Bf16 => hi as f64,
                        TcInputs::F16 => half::f16::from_f32(x).to_f64(),
                    }
            };
            for c in 0..w {
                let v = case.want(t, c, bias, residual, input);
                // Row-scaled cases: errors grow with the row's scale (its square with GeGLU,
                // whose two sums both scale).
                let v_scale = if config.row_scales {
                    scales[t].powi(if epilogue == Epilogue::GeGlu { 2 } else { 1 })
                } else {
                    1.0
                };
                // Column c lands in part k at column c - (parts before it).
                let (mut k, mut cc) = (0, c);
                while cc >= parts[k] {
                    cc -= parts[k];
                    k += 1;
                }
                worst = worst.max(gap(got[k][t * parts[k] + cc], v as f32) / v_scale);
            }
        }
        assert!(
            worst < 1e-4,
            "{name} {config:?} k parts {k_split}: max |diff| {worst}"
        );
        for (o, &p) in got.iter().zip(&parts) {
            assert!(
                o[tokens * p..].iter().all(|v| v.is_nan()),
                "{name}: wrote past the count"
            );
        }
    }
}

/// `Kernel::last_block_done` in a kernel of its own: every block writes one value per thread
/// (block · 64 + tid), the last block to finish sums each thread's column over the blocks.
/// Right, race-free and with the counter back at 0 in every block order, launch after launch.
#[test]
fn the_last_block_done_sums_what_every_block_wrote() {
    use griffin_backend_ptx::builder::{Class, Kernel};
    use griffin_backend_ptx::emu::BlockOrder;
    let (blocks, threads) = (7u32, 64u32);
    let mut k = Kernel::new("sums");
    let parts = k.param_ptr("parts");
    let counter = k.param_ptr("counter");
    let out = k.param_ptr("out");
    let (tid, block) = k.thread_and_block();
    let v = k.reg(Class::B32);
    k.ins(format!("mad.lo.u32 {v}, {block}, {threads}, {tid};"));
    let at = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {at}, {v}, 4;"));
    k.ins(format!("add.u64 {at}, {at}, {parts};"));
    k.ins(format!("st.global.u32 [{at}], {v};"));
    let last = k.last_block_done(counter, tid);
    let end = k.label("end");
    k.ins(format!("@!{last} bra {end};"));
    let sum = k.imm_u32(0);
    for b in 0..blocks {
        let x = k.reg(Class::B32);
        let a = k.reg(Class::B64);
        k.ins(format!("mul.wide.u32 {a}, {tid}, 4;"));
        k.ins(format!("add.u64 {a}, {a}, {parts};"));
        k.ins(format!("ld.global.u32 {x}, [{a}+{}];", 4 * b * threads));
        k.ins(format!("add.u32 {sum}, {sum}, {x};"));
    }
    let o = k.reg(Class::B64);
    k.ins(format!("mul.wide.u32 {o}, {tid}, 4;"));
    k.ins(format!("add.u64 {o}, {o}, {out};"));
    k.ins(format!("st.global.u32 [{o}], {sum};"));
    k.place(&end);
    let m = Module::parse(&module(&[k.finish()])).unwrap();
    for order in [
        BlockOrder::Forward,
        BlockOrder::Reverse,
        BlockOrder::Shuffled(5),
    ] {
        let mut mem = Memory::new();
        mem.set_block_order(order);
        let parts = mem.alloc(&vec![0; (4 * blocks * threads) as usize]);
        let counter = mem.alloc(&[0; 4]);
        let out = mem.alloc(&vec![0; 4 * threads as usize]);
        for _ in 0..3 {
            let launch = Launch {
                grid: blocks,
                block: threads,
                params: &[parts, counter, out],
            };
            run(&m, "sums", &launch, &mut mem).unwrap();
            let want: Vec<u32> = (0..threads)
                .map(|t| (0..blocks).map(|b| b * threads + t).sum())
                .collect();
            assert_eq!(
                mem.read_u32(out, threads as usize).unwrap(),
                want,
                "{order:?}"
            );
            assert_eq!(mem.read_u32(counter, 1).unwrap(), [0], "{order:?}");
        }
    }
}

/// The warpgroup projection keeps each k-step's `wgmma` in flight while the next is staged:
/// it retires it before rewriting the A registers, passes a barrier before any warpgroup
/// stages into the buffer it read, and retires the last before the epilogue. Each of the
/// three left out of the kernel is an error in the interpreter; with them, exact sums.
#[test]
fn warpgroup_projection_retires_each_wgmma_before_reusing_what_it_reads() {
    use griffin_backend_ptx::rg_lru::Storage;
    use griffin_backend_ptx::tc::{gemm_tokens_tc, tc_block, tc_grid, TcConfig, TcInputs, TcMma};
    let (inputs, width, tokens) = (64usize, 8usize, 128usize);
    let spec = GemvSpec {
        name: "p".into(),
        inputs: inputs as u32,
        width: width as u32,
        bias: false,
        epilogue: Epilogue::None,
        residual: false,
        norm: None,
        weights: Storage::Bf16,
    };
    let config = TcConfig {
        inputs: TcInputs::Split,
        mma: TcMma::Warpgroup,
        row_scales: false,
    };
    let ptx = module(&[gemm_tokens_tc(&spec, &[], config, 2)]);
    // Small integers: every product and sum exact.
    let x: Vec<f32> = (0..tokens * inputs)
        .map(|j| ((j / inputs + j % inputs) % 5) as f32 - 2.0)
        .collect();
    let w: Vec<f32> = (0..width * inputs)
        .map(|j| ((3 * (j / inputs) + j % inputs) % 7) as f32 - 3.0)
        .collect();
    let want: Vec<f32> = (0..tokens * width)
        .map(|j| {
            let (t, o) = (j / width, j % width);
            (0..inputs)
                .map(|i| x[t * inputs + i] * w[o * inputs + i])
                .sum()
        })
        .collect();
    let w_bf16: Vec<u8> = w
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let run_ptx = |ptx: &str| {
        let m = Module::parse(ptx).unwrap();
        let mut mem = Memory::new();
        let params = [
            mem.alloc_u32(&[tokens as u32]),
            mem.alloc_f32(&x),
            mem.alloc(&w_bf16),
            mem.alloc_f32(&vec![0.0; tokens * width]),
        ];
        let launch = Launch {
            grid: tc_grid(&spec, tokens as u32, 2),
            block: tc_block(2),
            params: &params,
        };
        run(&m, "p", &launch, &mut mem)?;
        mem.read_f32(params[3], tokens * width)
    };
    assert_eq!(run_ptx(&ptx).unwrap(), want);
    const WAIT: &str = "\twgmma.wait_group.sync.aligned 0;\n";
    const COMMIT_BAR: &str = "\twgmma.commit_group.sync.aligned;\n\tbar.sync 0;\n";
    assert_eq!(ptx.matches(WAIT).count(), 2);
    let fails = |ptx: String, why: &str| {
        let e = run_ptx(&ptx).unwrap_err();
        assert!(e.0.contains(why), "{e}");
    };
    let first = ptx.find(WAIT).unwrap();
    let last = ptx.rfind(WAIT).unwrap();
    let without = |at: usize| format!("{}{}", &ptx[..at], &ptx[at + WAIT.len()..]);
    fails(
        without(first),
        "touches a register of a wgmma still in flight",
    );
    fails(
        without(last),
        "touches a register of a wgmma still in flight",
    );
    // Without the barrier, a warpgroup's stores meet the other's reads of that buffer (its
    // wait retired them in the same barrier interval).
    fails(
        ptx.replacen(COMMIT_BAR, "\twgmma.commit_group.sync.aligned;\n", 1),
        "data race",
    );
}
