//! Real weights: stories260k from ../shared (the tests fail when ../shared is absent).

mod common;

use dejavu::backend::CpuBackend as B;
use dejavu::decode::{generate, RefDecoder, Sampling};
use dejavu::{Model, ModelFiles};

#[test]
fn stories260k_greedy_from_bos_tells_of_lily() {
    let shared = common::shared_dir();
    let dir = shared.join("models/stories260k");
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model: Model<B> = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    let bos = files.config.bos_token_id.unwrap();
    let out = generate(&mut RefDecoder::dense(&model), &[bos], 40, Sampling::default(), &[], |_| true).unwrap();
    let text = files.tokenizer.decode(&out.new_tokens, true).unwrap();
    eprintln!("stories260k: {text:?}");
    assert!(text.starts_with("Once upon a time, there was a little girl named Lily."), "{text:?}");
}

#[test]
fn stories260k_generate_cli() {
    let shared = common::shared_dir();
    let dir = shared.join("models/stories260k");
    let out = common::dejavu(&["generate", "--model", dir.to_str().unwrap(), "-n", "20"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("Once upon a time, there was a little girl named Lily."), "{}", out.stdout);
}
