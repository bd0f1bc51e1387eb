//! Write the seeded tiny fixture models into a directory (default `tests/fixtures`), one subdirectory each.
//! The committed copies there are what `scripts/hf_reference.py` computed the transformers logits on.
fn main() -> std::io::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures".into());
    for spec in dejavu::fixture::all() {
        let dir = std::path::Path::new(&out).join(spec.name);
        dejavu::fixture::write(&spec, &dir, dejavu::fixture::FixtureDtype::F32)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}
