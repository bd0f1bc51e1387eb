//! Write a synthetic f16 Llama checkpoint of real size (default 9 layers, 1.19 GB) into a directory, one tensor
//! in memory at a time: `write_synthetic DIR [LAYERS]`. Used by `scripts/raw_rss.sh`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: write_synthetic DIR [LAYERS]")?;
    let layers: usize = match args.next() {
        Some(l) => l.parse().map_err(|e| format!("LAYERS {l:?}: {e}"))?,
        None => 9,
    };
    let spec = dejavu::fixture::synthetic_llama(layers);
    let dir = std::path::Path::new(&dir);
    dejavu::fixture::write(&spec, dir, dejavu::fixture::FixtureDtype::F16)?;
    let bytes = std::fs::metadata(dir.join("model.safetensors"))?.len();
    println!("wrote {} ({layers} layers, {:.3} GB of f16 safetensors)", dir.display(), bytes as f64 / 1e9);
    Ok(())
}
