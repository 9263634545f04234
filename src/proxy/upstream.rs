//! Sending a request to an upstream (vLLM or a peer) and streaming its answer to the client.
//!
//! Each worker owns a [`Pool`] of keep-alive connections per upstream address. A pooled
//! connection is checked with a non-blocking `MSG_PEEK` before reuse (an upstream that closed
//! an idle connection shows EOF), and if a reused connection still fails before any byte of the
//! answer, the request is sent once more on a fresh connection: the upstream closed it without
//! reading the request, so nothing ran twice.
//!
//! The answer is streamed: every read from the upstream is written to the client at once, so
//! SSE events arrive one by one. Chunked bodies pass through as they are to HTTP/1.1 clients
//! (the decoder only finds their end) and are decoded for HTTP/1.0 ones. While the proxy waits
//! on the upstream it also watches the client socket: a client that hangs up cancels the
//! upstream request (the upstream connection is closed, which vLLM takes as an abort).

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use monoio::{
    buf::IoBufMut,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};

use crate::{
    config::ServerConfig,
    error::{Error, ErrorKind},
    http::{BodyKind, Method, ParsedResponse, RequestHead, ResponseHead, chunked::ChunkedDecoder},
    metrics::Metrics,
    server::conn::Conn,
    shutdown::Shutdown,
    tls::{self, Stream},
};

/// Idle connections kept per upstream address and worker.
const MAX_IDLE_PER_ADDR: usize = 256;
/// Spare buffers kept per worker, and the largest kept.
const MAX_SPARE_BUFS: usize = 64;
const MAX_SPARE_BUF: usize = 256 * 1024;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for response bodies.
const BODY_CHUNK: usize = 64 * 1024;
/// A pooled connection idle for less than this is reused without peeking at it first: no
/// upstream closes a keep-alive connection this young for idleness (uvicorn's default is 5 s),
/// and one closed all the same (a restart) fails before the first byte of the answer, which
/// sends the request once more on a fresh connection. Under load most requests take a
/// connection pooled a moment ago, and skip the syscall.
const PEEK_AFTER: Duration = Duration::from_millis(100);
/// A request this large may take a while to write: a peer's acknowledgement held back is
/// sent first (`Conn::acknowledge`).
const RELEASE_ACK_ABOVE: usize = 64 * 1024;
/// How long an answer may take before the proxy starts watching the client for a hang-up.
/// Quick answers (most of them) never pay for the extra poll.
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(5);

struct Idle {
    stream: Stream,
    since: Instant,
}

/// A worker's keep-alive connections to its upstreams.
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    /// Spare buffers, so a request costs no allocation for its head and body bytes.
    bufs: RefCell<Vec<Vec<u8>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Where a request goes.
pub struct Target<'a> {
    pub addrs: &'a [SocketAddr],
    /// For messages: `vLLM` or the peer's address.
    pub name: &'a str,
    /// Bounds connect + response head (forwards); `None` for the local vLLM, whose long
    /// non-streaming generations may take minutes before the head.
    pub head_timeout: Option<Duration>,
    /// The upstream acknowledges a request with `100 Continue` as soon as it has it (loraplex
    /// peers do). Until then nothing was delivered: a close or a timeout before the
    /// acknowledgement lets the request go elsewhere.
    pub acknowledges: bool,
    /// Local address to connect from (peers: this node's own address, so the peer recognises
    /// the connection as coming from a peer even on a host with several addresses).
    pub source: Option<std::net::IpAddr>,
    /// Dial TLS with this config (`cluster.tls`, peers); `None`: plain HTTP. An address is
    /// dialled one way only (peers and vLLM have addresses of their own), so the pool's
    /// connections are keyed by address alone.
    pub tls: Option<&'a Arc<rustls::ClientConfig>>,
}

/// How far a failed exchange got; decides what the caller may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Nothing reached the upstream: the request may go elsewhere.
    Connect,
    /// The request was (or may have been) delivered: it must not be sent elsewhere,
    /// but the client has not seen anything yet and gets an error answer.
    Sent,
    /// The client has seen the head; the connection can only be closed.
    Streaming,
    /// The client hung up.
    ClientGone,
}

#[derive(Debug)]
pub struct UpstreamError {
    pub stage: Stage,
    pub error: Error,
}

impl UpstreamError {
    fn new(stage: Stage, kind: ErrorKind, msg: String) -> UpstreamError {
        UpstreamError {
            stage,
            error: Error::new(kind, msg),
        }
    }
}

/// What the client saw.
pub struct Answered {
    pub status: u16,
    /// The client connection may serve another request.
    pub keep_alive: bool,
    /// When the response head arrived (for forward-duration metrics).
    pub head_at: Instant,
}

impl Pool {
    pub fn new(cfg: &ServerConfig, metrics: Arc<Metrics>) -> Pool {
        Pool {
            idle: RefCell::new(HashMap::new()),
            bufs: RefCell::new(Vec::new()),
            connect_timeout: cfg.upstream_connect_timeout,
            idle_timeout: cfg.upstream_idle_timeout,
            metrics,
        }
    }

    /// An empty buffer (a spare one when there is one). New ones are made [`BODY_CHUNK`]
    /// large: a body read grows a smaller one to that anyway, and a spare grown mid-request
    /// would cost an allocation in steady state.
    pub fn take_buf(&self) -> Vec<u8> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BODY_CHUNK))
    }

    /// Hand a buffer back for reuse (big ones are let go).
    pub fn give_buf(&self, mut buf: Vec<u8>) {
        let mut bufs = self.bufs.borrow_mut();
        if buf.capacity() <= MAX_SPARE_BUF && bufs.len() < MAX_SPARE_BUFS {
            buf.clear();
            bufs.push(buf);
        }
    }

    /// A live idle connection to `addr`, most recently used first. One pooled for less than
    /// [`PEEK_AFTER`] is taken without the `MSG_PEEK` check (a syscall per request).
    fn take_idle(&self, addr: SocketAddr) -> Option<Stream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(mut c) = list.pop() {
            let idle_for = c.since.elapsed();
            if idle_for < PEEK_AFTER && !c.stream.has_buffered_input() {
                return Some(c.stream);
            }
            if idle_for < self.idle_timeout && still_open(&mut c.stream) {
                return Some(c.stream);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, stream: Stream) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }

    async fn connect(
        &self,
        target: &Target<'_>,
        budget: Duration,
    ) -> Result<(Stream, SocketAddr), UpstreamError> {
        let mut last = String::from("no address");
        for &addr in target.addrs {
            let dial = async {
                let stream = connect_from(addr, target.source).await?;
                let _ = stream.set_nodelay(true);
                match target.tls {
                    // A handshake refused (a certificate not of the cluster CA) is like a
                    // refused connect: nothing was sent, the next peer may take the request.
                    Some(cfg) => tls::connect(cfg, stream, addr.ip())
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS: {e}"))),
                    None => Ok(Stream::Plain(stream)),
                }
            };
            match monoio::time::timeout(budget, dial).await {
                Ok(Ok(stream)) => {
                    self.metrics.upstream_connects.inc();
                    return Ok((stream, addr));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("connect timed out after {budget:?}"),
            }
        }
        let kind = if last.contains("timed out") {
            ErrorKind::Timeout
        } else {
            ErrorKind::Unavailable
        };
        Err(UpstreamError::new(
            Stage::Connect,
            kind,
            format!("{} is unreachable: {last}", target.name),
        ))
    }

    /// Send `req` to `target` and stream the answer to `client`.
    pub async fn exchange(
        &self,
        client: &mut Conn,
        target: &Target<'_>,
        req: Request<'_>,
    ) -> Result<Answered, UpstreamError> {
        let started = Instant::now();
        let connect_budget = target
            .head_timeout
            .map_or(self.connect_timeout, |t| t.min(self.connect_timeout));
        let deadline = target.head_timeout.map(|t| started + t);
        let mut bytes = req.bytes;
        // A pooled connection first; if it proves dead before answering, one fresh connection.
        let mut pooled = target
            .addrs
            .iter()
            .find_map(|&a| self.take_idle(a).map(|s| (s, a)));
        loop {
            let reused = pooled.is_some();
            let (mut stream, addr) = match pooled.take() {
                Some(c) => c,
                None => {
                    client.release_ack();
                    self.connect(target, connect_budget).await?
                }
            };
            if bytes.len() > RELEASE_ACK_ABOVE {
                client.release_ack();
            }
            tracing::trace!(upstream = target.name, %addr, reused, "sending");
            let (res, back) = stream.write_all(bytes).await;
            bytes = back;
            if let Err(e) = res {
                if reused {
                    continue;
                }
                let msg = format!("sending to {}: {e}", target.name);
                return Err(UpstreamError::new(Stage::Sent, ErrorKind::BadGateway, msg));
            }
            match read_head(self, &mut stream, client, req.method, target, deadline).await {
                Ok(head) => {
                    self.give_buf(bytes);
                    return relay(self, stream, addr, client, head, &req.client).await;
                }
                Err(HeadError::ClosedEarly) if reused => continue,
                Err(HeadError::ClosedEarly) => {
                    let msg = format!("{} closed the connection without answering", target.name);
                    let stage = if target.acknowledges {
                        Stage::Connect
                    } else {
                        Stage::Sent
                    };
                    return Err(UpstreamError::new(stage, ErrorKind::BadGateway, msg));
                }
                Err(HeadError::Failed(e)) => return Err(e),
            }
        }
    }
}

/// Connect to `addr`, from `source` when given.
async fn connect_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(source) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect_addr(addr).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable(false).await?;
    // The connect's outcome.
    let fd = stream.as_raw_fd();
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reading an int socket option into a local of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err));
    }
    Ok(stream)
}

/// A request ready to go upstream.
pub struct Request<'a> {
    /// The whole serialised request: head and body.
    pub bytes: Vec<u8>,
    pub method: Method,
    pub client: ClientSide<'a>,
}

impl<'a> Request<'a> {
    /// The client's request (`head` with `upstream_extra` headers added, then `body`) in a
    /// pooled buffer; its answer goes back to that client with `client_extra` headers added.
    pub fn relay(
        pool: &Pool,
        head: &RequestHead,
        upstream_extra: &[(&str, &[u8])],
        body: &[u8],
        client_extra: &'a [(&'a str, &'a [u8])],
        shutdown: &'a Shutdown,
    ) -> Request<'a> {
        let mut bytes = pool.take_buf();
        head.write_forward(&mut bytes, upstream_extra, body.len());
        bytes.extend_from_slice(body);
        Request {
            bytes,
            method: head.kind,
            client: ClientSide {
                minor: head.minor,
                keep_alive: head.keep_alive,
                extra: client_extra,
                shutdown,
            },
        }
    }
}

/// What the answer must look like for the client.
pub struct ClientSide<'a> {
    /// The client's HTTP minor version.
    pub minor: u8,
    /// The client wants the connection kept open.
    pub keep_alive: bool,
    /// Headers added to the answer.
    pub extra: &'a [(&'a str, &'a [u8])],
    /// Checked when the answer's head is written: a node shutting down says `connection: close`.
    pub shutdown: &'a Shutdown,
}

/// A response head and the body bytes that came with it (in the head's buffer).
struct Head {
    head: ResponseHead,
    /// Start of body bytes in the head's buffer.
    body_start: usize,
    at: Instant,
}

enum HeadError {
    /// EOF before any byte: the upstream closed a (reused) connection.
    ClosedEarly,
    Failed(UpstreamError),
}

async fn read_head(
    pool: &Pool,
    stream: &mut Stream,
    client: &Conn,
    method: Method,
    target: &Target<'_>,
    mut deadline: Option<Instant>,
) -> Result<Head, HeadError> {
    let fail = |kind, msg: String| HeadError::Failed(UpstreamError::new(Stage::Sent, kind, msg));
    let mut buf = pool.take_buf();
    // Any byte at all from the upstream: from then on the request was surely delivered.
    let mut answered = false;
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_RESPONSE_HEAD {
                let msg = format!("{}: response head too large", target.name);
                return Err(fail(ErrorKind::BadGateway, msg));
            }
            buf.reserve(buf.len());
        }
        let (back, outcome) = read_watching(stream, buf, client, deadline).await;
        buf = back;
        match outcome {
            ReadEvent::Data => answered = true,
            ReadEvent::Eof if !answered => return Err(HeadError::ClosedEarly),
            ReadEvent::Eof => {
                let msg = format!("{}: truncated response head", target.name);
                return Err(fail(ErrorKind::BadGateway, msg));
            }
            ReadEvent::Failed(e) if !answered && is_reset(&e) => {
                return Err(HeadError::ClosedEarly);
            }
            ReadEvent::Failed(e) => {
                return Err(fail(ErrorKind::BadGateway, format!("{}: {e}", target.name)));
            }
            ReadEvent::TimedOut => {
                let msg = format!("{} did not answer in time", target.name);
                if target.acknowledges && !answered {
                    let e = UpstreamError::new(Stage::Connect, ErrorKind::Timeout, msg);
                    return Err(HeadError::Failed(e));
                }
                return Err(fail(ErrorKind::Timeout, msg));
            }
            ReadEvent::ClientGone => return Err(HeadError::Failed(client_gone_error())),
        }
        // One read may hold an interim answer and the final head after it.
        loop {
            match ResponseHead::parse(buf, method) {
                Ok(ParsedResponse::Head(head, len))
                    if (100..200).contains(&head.status) && head.status != 101 =>
                {
                    // An interim answer: not for the client. A peer sends `100 Continue` as
                    // soon as it has a forwarded request, which ends the forward timeout: what
                    // follows is the generation, which may take as long as it takes.
                    buf = head.into_buf();
                    buf.drain(..len);
                    deadline = None;
                }
                Ok(ParsedResponse::Head(head, len)) => {
                    return Ok(Head {
                        head,
                        body_start: len,
                        at: Instant::now(),
                    });
                }
                Ok(ParsedResponse::Partial(back)) => {
                    buf = back;
                    break;
                }
                Err(error) => {
                    return Err(HeadError::Failed(UpstreamError {
                        stage: Stage::Sent,
                        error,
                    }));
                }
            }
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

fn client_gone_error() -> UpstreamError {
    UpstreamError::new(
        Stage::ClientGone,
        ErrorKind::BadRequest,
        "client went away".into(),
    )
}

/// How a body is taken from the upstream.
enum Relay {
    Done,
    Length(u64),
    Chunked {
        decoder: ChunkedDecoder,
        decode: bool,
    },
    UntilClose,
}

impl Relay {
    fn is_done(&self) -> bool {
        match self {
            Relay::Done => true,
            Relay::Length(n) => *n == 0,
            Relay::Chunked { decoder, .. } => decoder.is_done(),
            Relay::UntilClose => false,
        }
    }

    /// Take the body bytes at the start of `data`. Returns how many belong to the body and
    /// whether they were decoded into `decoded` (else they go to the client as they are).
    fn feed(&mut self, data: &[u8], decoded: &mut Vec<u8>) -> Result<(usize, bool), Error> {
        match self {
            Relay::Done => Ok((0, false)),
            Relay::Length(n) => {
                let take = data.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                Ok((take, false))
            }
            Relay::Chunked {
                decoder,
                decode: false,
            } => Ok((decoder.feed(data, None)?, false)),
            Relay::Chunked {
                decoder,
                decode: true,
            } => Ok((decoder.feed(data, Some(decoded))?, true)),
            Relay::UntilClose => Ok((data.len(), false)),
        }
    }
}

/// Stream the answer to the client; pool the upstream connection when it ended cleanly.
async fn relay(
    pool: &Pool,
    mut upstream: Stream,
    addr: SocketAddr,
    client: &mut Conn,
    head: Head,
    side: &ClientSide<'_>,
) -> Result<Answered, UpstreamError> {
    let Head {
        head,
        body_start,
        at,
    } = head;
    let (status, upstream_keep_alive) = (head.status, head.keep_alive);
    let (client_body, mut relay) = match head.body {
        BodyKind::None => (BodyKind::None, Relay::Done),
        BodyKind::Length(n) => (BodyKind::Length(n), Relay::Length(n)),
        BodyKind::Chunked if side.minor == 1 => (
            BodyKind::Chunked,
            Relay::Chunked {
                decoder: ChunkedDecoder::new(),
                decode: false,
            },
        ),
        // HTTP/1.0 clients don't know chunked: decode, and end the body by closing.
        BodyKind::Chunked => (
            BodyKind::UntilClose,
            Relay::Chunked {
                decoder: ChunkedDecoder::new(),
                decode: true,
            },
        ),
        BodyKind::UntilClose => (BodyKind::UntilClose, Relay::UntilClose),
    };
    let keep_alive =
        side.keep_alive && client_body != BodyKind::UntilClose && !side.shutdown.is_triggered();
    let streaming = |e: Error| UpstreamError {
        stage: Stage::Streaming,
        error: e,
    };
    let mut clean = upstream_keep_alive;

    // The head and whatever body bytes came with it, in one write.
    let mut out = pool.take_buf();
    head.write_client(&mut out, client_body, keep_alive, side.minor, side.extra);
    let mut decoded = Vec::new();
    let first = &head.buf()[body_start..];
    let (used, was_decoded) = relay.feed(first, &mut decoded).map_err(streaming)?;
    clean &= used == first.len();
    if was_decoded {
        out.extend_from_slice(&decoded);
    } else {
        out.extend_from_slice(&first[..used]);
    }
    let mut buf = head.into_buf();
    let out = client
        .write_all(out)
        .await
        .map_err(|_| client_gone_error())?;
    pool.give_buf(out);

    let mut ended_by_close = false;
    while !relay.is_done() {
        buf.clear();
        if buf.capacity() < BODY_CHUNK {
            buf.reserve(BODY_CHUNK);
        }
        let (back, outcome) = read_watching(&mut upstream, buf, client, None).await;
        buf = back;
        match outcome {
            ReadEvent::Data => {}
            ReadEvent::Eof if matches!(relay, Relay::UntilClose) => {
                ended_by_close = true;
                break;
            }
            ReadEvent::Eof => {
                return Err(streaming(Error::new(
                    ErrorKind::BadGateway,
                    "upstream closed mid-body",
                )));
            }
            ReadEvent::Failed(e) => {
                return Err(streaming(Error::new(
                    ErrorKind::BadGateway,
                    format!("upstream: {e}"),
                )));
            }
            ReadEvent::TimedOut => unreachable!("no deadline while streaming a body"),
            ReadEvent::ClientGone => return Err(client_gone_error()),
        }
        decoded.clear();
        let (used, was_decoded) = relay.feed(&buf, &mut decoded).map_err(streaming)?;
        clean &= used == buf.len();
        if was_decoded {
            if !decoded.is_empty() {
                decoded = client
                    .write_all(decoded)
                    .await
                    .map_err(|_| client_gone_error())?;
            }
        } else {
            buf.truncate(used);
            buf = client
                .write_all(buf)
                .await
                .map_err(|_| client_gone_error())?;
        }
    }
    pool.give_buf(buf);
    let pooled = clean && !ended_by_close && relay.is_done();
    tracing::trace!(%addr, status, pooled, "answer relayed");
    if pooled {
        pool.put(addr, upstream);
    }
    Ok(Answered {
        status,
        keep_alive,
        head_at: at,
    })
}

/// What one read from an upstream gave.
enum ReadEvent {
    /// Bytes were appended to the buffer.
    Data,
    Eof,
    Failed(std::io::Error),
    TimedOut,
    ClientGone,
}

/// Read from `stream`, appending to `buf`, while watching the client for a hang-up and an
/// optional deadline. When the read is abandoned its buffer is lost with it (the connection
/// is closed anyway), so an empty one comes back.
async fn read_watching(
    stream: &mut Stream,
    buf: Vec<u8>,
    client: &Conn,
    deadline: Option<Instant>,
) -> (Vec<u8>, ReadEvent) {
    let (len, cap) = (buf.len(), buf.capacity());
    let read = stream.read(buf.slice_mut(len..cap));
    let deadline = async move {
        match deadline {
            Some(d) => monoio::time::sleep_until(monoio::time::Instant::from_std(d)).await,
            None => std::future::pending().await,
        }
    };
    monoio::select! {
        (res, slice) = read => {
            let buf = slice.into_inner();
            match res {
                Ok(0) => (buf, ReadEvent::Eof),
                Ok(_) => (buf, ReadEvent::Data),
                Err(e) => (buf, ReadEvent::Failed(e)),
            }
        }
        _ = client_gone(client) => (Vec::new(), ReadEvent::ClientGone),
        _ = deadline => (Vec::new(), ReadEvent::TimedOut),
    }
}

/// Resolves when the client has closed its side (EOF or error). Starts watching only after
/// [`WATCH_CLIENT_AFTER`], when a peer's acknowledgement still held back is sent (the answer
/// is not coming at once). If the client has sent more bytes (a pipelined request), a hang-up
/// can't be seen without reading them, so it stops watching; except over TLS, where a client
/// closing sends bytes first (a close_notify alert): there a shut read side
/// (`POLLRDHUP`) behind the bytes counts as gone, checked every [`RECHECK_TLS`].
async fn client_gone(conn: &Conn) {
    monoio::time::sleep(WATCH_CLIENT_AFTER).await;
    conn.release_ack();
    let client = &conn.stream;
    let tcp = client.tcp();
    loop {
        if tcp.readable(false).await.is_err() {
            return;
        }
        match peek(tcp) {
            PeekResult::Eof | PeekResult::Error => return,
            PeekResult::Data if client.is_tls() => loop {
                if read_side_shut(tcp) {
                    return;
                }
                monoio::time::sleep(RECHECK_TLS).await;
            },
            PeekResult::Data => std::future::pending::<()>().await,
            PeekResult::Nothing => {}
        }
    }
}

/// How often a TLS client with unread bytes is checked for a hang-up.
const RECHECK_TLS: Duration = Duration::from_millis(100);

/// Whether the peer of `stream` has shut its sending side (FIN received), even with bytes
/// still unread.
fn read_side_shut(stream: &TcpStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, a zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

enum PeekResult {
    Eof,
    Data,
    Nothing,
    Error,
}

fn peek(stream: &TcpStream) -> PeekResult {
    let mut byte = 0u8;
    // SAFETY: a 1-byte read into a local buffer on an fd this stream owns.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => PeekResult::Eof,
        n if n > 0 => PeekResult::Data,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => PeekResult::Nothing,
            _ => PeekResult::Error,
        },
    }
}

/// An idle pooled connection is usable if the upstream has neither closed it nor sent
/// anything unasked (over TLS: nothing left unread in the TLS layer either).
fn still_open(stream: &mut Stream) -> bool {
    matches!(peek(stream.tcp()), PeekResult::Nothing) && !stream.has_buffered_input()
}
