//! The CUDA engine against CPU references. GPU only: built with `--features cuda` and ignored by default; run on
//! the GPU box with `cargo test --release --features cuda --test cuda_engine -- --ignored` (or, where the box has
//! no Rust toolchain, the same checks through the built binary: `scripts/h200_engine.sh check`).
#![cfg(feature = "cuda")]

mod common;

use dejavu::cuda::check;

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn every_kernel_matches_the_cpu_reference() {
    let checks = check::kernels(7).expect("kernel checks ran");
    assert!(checks.len() >= 100, "{} checks", checks.len());
    let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fixtures_decode_like_the_burn_reference() {
    let prompts: Vec<Vec<u32>> = (0..20u32).map(|i| vec![1 + i, 7 + 3 * i, 11 + 5 * i, 2 + i]).collect();
    for name in ["tiny-opt", "tiny-opt-proj", "tiny-llama-tied"] {
        let files = dejavu::ModelFiles::resolve(common::fixture_dir(name).to_str().unwrap()).unwrap();
        let c = check::model(&files, None, &prompts, 32, None, None, None).unwrap();
        // Greedy tokens may part only where the reference itself nearly ties.
        assert_eq!(c.identical + c.divergences_at_near_ties, c.prompts, "{c:?}");
        assert!(c.max_dlogprob < 0.05, "{c:?}");
    }
}
