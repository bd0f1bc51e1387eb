//! The look-ahead neuron predictors (`train-predictors --neuron-input block|prev`): in the reference forward a
//! layer's predicted MLP set is the top k of the scorer's scores of that layer's block input (the residual before
//! its attention; `prev`: the previous layer's block input, layer 0 its own), not of its MLP input
//! (`tests/collect_train.rs` trains such predictors and reads their manifest).

mod common;

use burn::tensor::Tensor;
use dejavu::backend::CpuBackend as B;
use dejavu::model::{to_host, Forward, Scorer, Sparse, TapSet};
use dejavu::predictor::NeuronInput;
use dejavu::sparse::{select, HeadRule, LayerPlan, MlpRule, Plan};
use dejavu::{Model, ModelFiles};

/// Neuron scores that change with every token and every layer: the input's channels repeated up to the MLP width.
struct Tiled {
    ffn: usize,
    input: NeuronInput,
}
impl Scorer<B> for Tiled {
    fn neuron_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        Tensor::cat(vec![x; self.ffn.div_ceil(d)], 2).slice([0..b, 0..s, 0..self.ffn])
    }
    fn neuron_input(&self) -> NeuronInput {
        self.input
    }
    fn head_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }
}

/// The scores [`Tiled`] gives one `[1, s, d]` tap, flattened `[s, ffn]`.
fn tiled(x: &[f32], d: usize, ffn: usize) -> Vec<f32> {
    x.chunks(d).flat_map(|row| (0..ffn).map(|j| row[j % d]).collect::<Vec<_>>()).collect()
}

#[test]
fn block_input_predictor_ranks_the_residual_before_the_attention() {
    for name in ["tiny-opt", "tiny-llama"] {
        let files = ModelFiles::resolve(common::fixture_dir(name).to_str().unwrap()).unwrap();
        let model = Model::<B>::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
        let c = &files.config;
        let (d, f) = (c.hidden, c.ffn);
        let k = f / 4;
        let plan = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::PredictedTopK { k }, heads: HeadRule::Dense });
        let ids: Vec<u32> = (0..10u32).map(|i| (i * 53 + 11) % c.vocab_size as u32).collect();
        let want = TapSet { block_input: true, mlp_input: true, mlp_keep: true, ..Default::default() };
        let (mut differs, mut prev_differs) = (0, 0);
        for input in [NeuronInput::Block, NeuronInput::Mlp, NeuronInput::Prev] {
            let scorer = Tiled { ffn: f, input };
            let mut taps = Vec::new();
            let sparse = Sparse::new(&plan, Some(&scorer)).unwrap();
            let _ = model.forward_with(model.tokens(std::slice::from_ref(&ids)), &mut model.new_cache(), Forward { taps: Some((&want, &mut taps)), sparse: Some(sparse), ..Default::default() });
            assert_eq!(taps.len(), c.layers);
            assert!(c.layers >= 2, "{name}: the previous layer's input needs two layers");
            let top = |x: Vec<f32>| -> Vec<Vec<usize>> { tiled(&x, d, f).chunks(f).map(|row| select::top_k(row, k)).collect() };
            let blocks: Vec<Vec<Vec<usize>>> = taps.iter().map(|t| top(to_host(t.block_input.clone().unwrap()))).collect();
            for (l, t) in taps.into_iter().enumerate() {
                let keep = to_host(t.mlp_keep.unwrap());
                let got: Vec<Vec<usize>> = keep.chunks(f).map(|row| (0..f).filter(|&j| row[j] == 1.0).collect()).collect();
                let (block, mlp) = (&blocks[l], top(to_host(t.mlp_input.unwrap())));
                let prev = &blocks[l.saturating_sub(1)];
                let expect = match input {
                    NeuronInput::Block => block,
                    NeuronInput::Mlp => &mlp,
                    NeuronInput::Prev => prev,
                };
                assert_eq!(&got, expect, "{name} layer {l} {input:?}: the kept sets are not the top {k} of that input's scores");
                differs += block.iter().zip(&mlp).filter(|(a, b)| a != b).count();
                prev_differs += block.iter().zip(prev).filter(|(a, b)| a != b).count();
            }
        }
        // Otherwise the test could not tell the inputs apart.
        assert!(differs > 0, "{name}: the block and MLP inputs rank alike at every token and layer");
        assert!(prev_differs > 0, "{name}: a layer's block input and the previous layer's rank alike at every token");
    }
}
