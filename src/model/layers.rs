//! Building blocks of the reference forward: linear layers, norms, rotary embedding, causal attention.
//! Written once, generic over the burn backend.

use burn::tensor::{activation, backend::Backend, Tensor, TensorData};

/// A dense projection. The weight is stored transposed, `[in, out]`, so the forward is one plain matmul.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// `[in, out]`
    pub w: Tensor<B, 2>,
    /// `[out]`
    pub b: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    pub fn d_out(&self) -> usize {
        self.w.dims()[1]
    }

    /// `x: [batch, seq, in] -> [batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let y = x.reshape([b * s, d]).matmul(self.w.clone()); // [b*s, out]
        let y = match &self.b {
            Some(bias) => y + bias.clone().unsqueeze::<2>(),
            None => y,
        };
        y.reshape([b, s, self.d_out()])
    }
}

/// LayerNorm (OPT) or RMSNorm (Llama) over the last dimension.
#[derive(Debug, Clone)]
pub enum Norm<B: Backend> {
    Layer { w: Tensor<B, 1>, b: Tensor<B, 1>, eps: f64 },
    Rms { w: Tensor<B, 1>, eps: f64 },
}

impl<B: Backend> Norm<B> {
    /// `x: [batch, seq, d] -> [batch, seq, d]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Norm::Layer { w, b, eps } => {
                let mean = x.clone().mean_dim(2); // [b, s, 1]
                let centered = x - mean;
                let var = centered.clone().powi_scalar(2).mean_dim(2);
                let y = centered / (var + *eps).sqrt();
                y * w.clone().unsqueeze::<3>() + b.clone().unsqueeze::<3>()
            }
            Norm::Rms { w, eps } => {
                let ms = x.clone().powi_scalar(2).mean_dim(2); // [b, s, 1]
                x / (ms + *eps).sqrt() * w.clone().unsqueeze::<3>()
            }
        }
    }
}

/// Rotary tables for positions `start..start+len`, computed as Hugging Face does (f32 inverse frequencies,
/// f32 angle products), in the `rotate_half` layout: `[len, head_dim]` each for cos and sin.
pub fn rope_tables<B: Backend>(
    start: usize,
    len: usize,
    head_dim: usize,
    theta: f64,
    dev: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> =
        (0..half).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in start..start + len {
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = (p as f32) * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [len, head_dim]), dev),
        Tensor::from_data(TensorData::new(sin, [len, head_dim]), dev),
    )
}

/// Apply RoPE to `x: [batch, heads, seq, head_dim]` with tables `[seq, head_dim]`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().unsqueeze::<4>() + rotated * sin.clone().unsqueeze::<4>()
}

/// Causal scaled-dot-product attention with grouped-query sharing.
///
/// `q: [batch, heads, seq, head_dim]`, `k, v: [batch, kv_heads, past+seq, head_dim]`; query row `i` sits at
/// absolute position `past + i` and sees keys `0..=past+i`. With `present: [batch, kv_heads, past+seq]` (1 or 0),
/// a query also skips the earlier positions where its key/value head is absent; its own position is always seen.
/// Returns `[batch, heads, seq, head_dim]`. Query heads are grouped onto their key/value head by reshaping the
/// queries, so the cache is never copied.
pub fn causal_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, present: Option<Tensor<B, 3>>, scale: f64) -> Tensor<B, 4> {
    let [b, h, s, d] = q.dims();
    let [_, kv, t, _] = k.dims();
    let g = h / kv;
    let past = t - s;
    let dev = q.device();
    // Head h = kv_index * g + group member, as in Hugging Face's repeat_kv.
    let q = q.reshape([b, kv, g * s, d]);
    let scores = q.matmul(k.swap_dims(2, 3)) * scale; // [b, kv, g*s, t]
    // seen[i, j]: 1 where query i may attend to key j by position alone (j < past + i), 2 on its own position.
    let seen = || {
        let m: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..t).map(move |j| match j.cmp(&(past + i)) {
                    std::cmp::Ordering::Less => 1.0f32,
                    std::cmp::Ordering::Equal => 2.0,
                    std::cmp::Ordering::Greater => 0.0,
                })
            })
            .collect();
        Tensor::<B, 2>::from_data(TensorData::new(m, [s, t]), &dev)
    };
    let scores = match present {
        // Visible where (own position) or (earlier and present): seen * (1 + present) >= 2.
        Some(p) => {
            let vis = seen().unsqueeze::<4>() * (p.unsqueeze_dim::<4>(2) + 1.0); // [b, kv, s, t]
            let blocked = vis.lower_elem(1.5).repeat_dim(2, g); // [b, kv, g*s, t], member-major like the queries
            scores.mask_fill(blocked, f32::NEG_INFINITY)
        }
        None if s > 1 => {
            let blocked = seen().lower_elem(0.5).unsqueeze::<4>().repeat_dim(2, g); // [1, 1, g*s, t]
            scores.mask_fill(blocked.expand([b, kv, g * s, t]), f32::NEG_INFINITY)
        }
        None => scores,
    };
    let probs = activation::softmax(scores, 3);
    probs.matmul(v).reshape([b, h, s, d])
}
