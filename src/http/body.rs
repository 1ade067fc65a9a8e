//! Bodies read ahead up to a bound.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use bytes::BytesMut;
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;
use crate::error::Error;
use crate::http::tee::TeeBody;

/// A body read ahead up to a bound: either complete (held whole, cheap to clone, so a
/// request can be replayed or a response shared and stored), or what was read ahead
/// followed by the rest of the original body, passed on intact. A response from the HTTP
/// cache may also be a body passed on as it arrives while the cache still reads it (see
/// [`HttpCacheLayer`](crate::http::HttpCacheLayer)); like a streaming one, it is neither
/// replayable nor cloned.
pub struct BufferedBody<B> {
    state: BodyState<B>,
}

enum BodyState<B> {
    Complete(Option<Bytes>),
    Streaming {
        read_ahead: VecDeque<Frame<Bytes>>,
        rest: Option<B>,
    },
    /// Passed on while the cache still reads it (see [`TeeBody`]).
    #[cfg_attr(not(feature = "cache"), allow(dead_code))]
    Tee(Box<TeeBody<B>>),
}

impl<B> BufferedBody<B> {
    /// A body with nothing still to read: what was read ahead, then the rest of `rest`.
    pub fn streaming(read_ahead: VecDeque<Frame<Bytes>>, rest: Option<B>) -> Self {
        BufferedBody {
            state: BodyState::Streaming { read_ahead, rest },
        }
    }

    /// A body the cache passes on while it still reads it.
    #[cfg_attr(not(feature = "cache"), allow(dead_code))]
    pub(crate) fn tee(body: TeeBody<B>) -> Self {
        BufferedBody {
            state: BodyState::Tee(Box::new(body)),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        BufferedBody {
            state: BodyState::Complete(None),
        }
    }

    /// A complete body.
    pub fn complete(data: Bytes) -> Self {
        BufferedBody {
            state: BodyState::Complete((!data.is_empty()).then_some(data)),
        }
    }

    /// Reads `body` ahead, up to `max` bytes: complete (its length known, see
    /// [`size_hint`](Body::size_hint)) when it ends within the bound, otherwise what was
    /// read followed by the rest of `body`. A trailers frame also ends what is read ahead.
    /// An error of `body` while it is read is returned (kind
    /// [`Inner`](crate::ErrorKind::Inner)).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body::Body;
    /// use http_body_util::Full;
    /// use towerguard::http::BufferedBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), towerguard::Error> {
    /// let read = BufferedBody::read_ahead(Full::new(Bytes::from("hello")), 1024).await?;
    /// assert!(read.is_replayable());
    /// assert_eq!(read.size_hint().exact(), Some(5));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read_ahead(body: B, max: usize) -> Result<Self, Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        read_ahead(body, max).await
    }

    /// True when the whole body is held and can be replayed.
    pub fn is_replayable(&self) -> bool {
        matches!(self.state, BodyState::Complete(_))
    }

    /// The bytes of a complete body; `None` for a streaming one.
    pub fn into_bytes(self) -> Option<Bytes> {
        match self.state {
            BodyState::Complete(data) => Some(data.unwrap_or_default()),
            BodyState::Streaming { .. } | BodyState::Tee(_) => None,
        }
    }

    /// A copy of a complete body; `None` for a streaming one.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.state {
            BodyState::Complete(data) => Some(BufferedBody {
                state: BodyState::Complete(data.clone()),
            }),
            BodyState::Streaming { .. } | BodyState::Tee(_) => None,
        }
    }
}

impl<B> Default for BufferedBody<B> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            BodyState::Complete(data) => f
                .debug_struct("BufferedBody")
                .field("complete", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            BodyState::Streaming { read_ahead, .. } => f
                .debug_struct("BufferedBody")
                .field("streaming_after", &read_ahead.len())
                .finish(),
            BodyState::Tee(body) => f.debug_tuple("BufferedBody").field(body).finish(),
        }
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().state {
            BodyState::Complete(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyState::Streaming { read_ahead, rest } => {
                if let Some(frame) = read_ahead.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                let Some(body) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = ready!(Pin::new(body).poll_frame(cx));
                if frame.is_none() {
                    *rest = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            BodyState::Tee(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Complete(data) => data.is_none(),
            BodyState::Streaming { read_ahead, rest } => {
                read_ahead.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
            BodyState::Tee(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Complete(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyState::Streaming { read_ahead, rest } => {
                let ahead: u64 = read_ahead
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
                // The upper bound first: `set_lower` asserts it stays at or below it.
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(ahead));
                }
                hint.set_lower(rest.lower().saturating_add(ahead));
                hint
            }
            BodyState::Tee(_) => SizeHint::new(),
        }
    }
}

/// Reads frames of `body` into `frames` (data also into `data`) until its end (`true`), a
/// trailers frame or more than `max` bytes (`false`).
pub(crate) fn poll_read_ahead<B>(
    mut body: Pin<&mut B>,
    frames: &mut VecDeque<Frame<Bytes>>,
    data: &mut BytesMut,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<bool, Error>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    loop {
        match ready!(body.as_mut().poll_frame(cx)) {
            None => return Poll::Ready(Ok(true)),
            Some(Err(error)) => return Poll::Ready(Err(Error::inner(error))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    frames.push_back(Frame::data(chunk));
                    if data.len() > max {
                        return Poll::Ready(Ok(false));
                    }
                }
                Err(trailers) => {
                    frames.push_back(trailers);
                    return Poll::Ready(Ok(false));
                }
            },
        }
    }
}

/// Reads `body` ahead up to `max` bytes: complete when it ends within the bound.
pub(crate) async fn read_ahead<B>(mut body: B, max: usize) -> Result<BufferedBody<B>, Error>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut frames = VecDeque::new();
    let mut data = BytesMut::new();
    let complete = std::future::poll_fn(|cx| {
        poll_read_ahead(Pin::new(&mut body), &mut frames, &mut data, max, cx)
    })
    .await?;
    Ok(if complete {
        BufferedBody::complete(data.freeze())
    } else {
        BufferedBody::streaming(frames, Some(body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_body_read_past_the_bound_keeps_its_declared_length() {
        for (len, max) in [(3_000_000usize, 1024usize), (200_000, 100 * 1024), (10, 0)] {
            let body = Full::new(Bytes::from(vec![b'x'; len]));
            let read = read_ahead(body, max).await.unwrap();
            assert!(!read.is_replayable());
            let hint = read.size_hint();
            assert_eq!((hint.lower(), hint.upper()), (len as u64, Some(len as u64)));
            let bytes = read.collect().await.unwrap().to_bytes();
            assert_eq!(bytes.len(), len);
        }
    }

    #[tokio::test]
    async fn a_body_with_no_rest_hints_what_was_read_ahead() {
        let mut frames = VecDeque::new();
        frames.push_back(Frame::data(Bytes::from_static(b"abc")));
        let body = BufferedBody::<Full<Bytes>>::streaming(frames, None);
        assert_eq!(body.size_hint().exact(), Some(3));
    }
}
