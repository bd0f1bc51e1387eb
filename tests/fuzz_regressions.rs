//! Inputs found by the mutation fuzzer (`scripts/fuzz.sh`, `examples/fuzz_parsers.rs`) that once made dejavu panic.
//! Each must now fail with one line naming the file, exit 1.

mod common;

/// A control character (DEL, 0x7f) where the tokenizer's `decoder` object has whitespace: the tokenizers library
/// panicked inside its decoder deserializer instead of returning an error.
#[test]
fn tokenizer_json_with_invalid_syntax_in_the_decoder_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    common::copy_fixture("tiny-llama", &dir);
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.find("\"decoder\"").expect("the fixture's tokenizer has a decoder");
    let brace = at + text[at..].find('{').unwrap();
    let mut bytes = text.into_bytes();
    bytes.insert(brace + 1, 0x7f);
    std::fs::write(&path, &bytes).unwrap();
    let out = common::dejavu(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "a", "-n", "1"], &[]);
    common::assert_one_line_exit(&out, 1, &["tokenizer.json", "not a valid tokenizer.json"]);
}

/// A trailing comma inside `decoder` (the same panic, another syntax error).
#[test]
fn tokenizer_json_with_a_trailing_comma_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    common::copy_fixture("tiny-opt", &dir);
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.find("\"decoder\"").expect("the fixture's tokenizer has a decoder");
    let close = at + text[at..].find('}').unwrap();
    let mut t = text.clone();
    t.insert(close, ',');
    std::fs::write(&path, t).unwrap();
    let out = common::dejavu(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "a", "-n", "1"], &[]);
    common::assert_one_line_exit(&out, 1, &["tokenizer.json", "not a valid tokenizer.json"]);
}
