//! The protobuf codec of Shoal's own services: prost, with small buffers.
//!
//! tonic gives every stream an encode and a decode buffer of 8 KiB each. A device's stream
//! carries one batch every few seconds, usually a few hundred bytes, and a hub holds one such
//! stream per connected device, so those two buffers alone were 16 KiB of every device's
//! memory at the hub (and on the agent). Here they start at [`BUFFER_BYTES`] and grow only
//! for a stream whose messages need it. The inference service keeps tonic's defaults: its
//! tensors are large.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers: an ack fits; a hello or a batch grows
/// the decode buffer to its own size once, and the buffer keeps that size for the stream's life.
pub const BUFFER_BYTES: usize = 128;

/// Bytes an encoder gathers before it hands them on (tonic's default).
const YIELD_BYTES: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] buffers; the generated `shoal.v1` clients
/// and servers use it.
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
