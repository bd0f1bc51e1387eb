//! Decoding ggml quant blocks (and the plain float types) into values.

use half::{bf16, f16};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantize `bytes` (a whole number of blocks, checked at open) of ggml type `type_id`; `None` if the type
/// is not supported.
pub(super) fn dequantize(type_id: u32, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match type_id {
        0 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        1 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        30 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        2 => {
            let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            out
        }
        3 => {
            let mut out = Vec::with_capacity(bytes.len() / 20 * 32);
            for blk in bytes.chunks_exact(20) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            out
        }
        8 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
            out
        }
        _ => return None,
    })
}
