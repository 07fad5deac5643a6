//! The codec of every generated service: prost, with a small initial buffer.
//!
//! tonic's default codec gives each stream an 8 KiB encode buffer for its whole life. kubelet keeps
//! a `ListAndWatch` stream open to every device-plugin server, one per Instance, and its messages
//! are a few hundred bytes, so at 1,000 Instances the default would hold ~8 MiB that is never
//! used. The buffer still grows for a large message (a Configuration's resource lists every slot).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer of a stream, in bytes: above a device-plugin message with a
/// few slots, below a memory page.
pub const INITIAL_BUFFER: usize = 512;

/// tonic's default: an encoding stream yields to the runtime after this many buffered bytes.
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`INITIAL_BUFFER`]-sized buffers.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
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
