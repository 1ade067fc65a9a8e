//! Codecs: how values cross the wire.

/// Turns values into bytes for the second tier and back.
pub trait Codec<V>: Send + Sync + 'static {
    /// The bytes to store for `value`; `None` keeps it out of the second tier.
    fn encode(&self, value: &V) -> Option<Vec<u8>>;
    /// The value `bytes` stand for; `None` when they cannot be read (counted as a miss).
    fn decode(&self, bytes: &[u8]) -> Option<V>;
}

/// The identity codec for byte values (`Vec<u8>` and `bytes::Bytes`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn encode(&self, value: &Vec<u8>) -> Option<Vec<u8>> {
        Some(value.clone())
    }
    fn decode(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        Some(bytes.to_vec())
    }
}

#[cfg(feature = "http")]
impl Codec<bytes::Bytes> for Raw {
    fn encode(&self, value: &bytes::Bytes) -> Option<Vec<u8>> {
        Some(value.to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Option<bytes::Bytes> {
        Some(bytes::Bytes::copy_from_slice(bytes))
    }
}

/// UTF-8 text values (`String`); bytes that are not UTF-8 read as a miss.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(&self, value: &String) -> Option<Vec<u8>> {
        Some(value.as_bytes().to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Option<String> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// JSON through serde (feature `serde`): any `Serialize + DeserializeOwned` value; bytes
/// that do not parse read as a miss.
#[cfg(feature = "serde")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

#[cfg(feature = "serde")]
impl<V> Codec<V> for Json
where
    V: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, value: &V) -> Option<Vec<u8>> {
        serde_json::to_vec(value).ok()
    }
    fn decode(&self, bytes: &[u8]) -> Option<V> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_reads_back_what_it_wrote_and_refuses_invalid_bytes() {
        let bytes = Utf8.encode(&"héllo".to_owned()).unwrap();
        assert_eq!(Utf8.decode(&bytes).as_deref(), Some("héllo"));
        assert_eq!(Utf8.decode(&[0xff, 0xfe]), None);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_reads_back_what_it_wrote_and_refuses_what_does_not_parse() {
        let value: Vec<(String, u32)> = vec![("a".into(), 1), ("b".into(), 2)];
        let bytes = Json.encode(&value).unwrap();
        assert_eq!(Json.decode(&bytes), Some(value));
        assert_eq!(
            <Json as Codec<Vec<(String, u32)>>>::decode(&Json, b"{"),
            None
        );
    }
}
