//! Host-side tensors as read from a checkpoint, before they are moved to a burn device.

/// A tensor read from a checkpoint and converted to f32.
///
/// `data` is row-major over `shape`, and `shape` follows the Hugging Face checkpoint convention
/// (a `Linear` weight is `[out_features, in_features]`, an embedding `[vocab, hidden]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
