//! The admin socket's framing: one JSON value per line, and file descriptors passed beside a
//! line (`SCM_RIGHTS`), which is how a file crosses between the daemon and its client without
//! either opening a path the other named.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Longest request the daemon accepts.
pub const MAX_LINE: usize = 1 << 20;
/// Longest reply a client accepts (a list of many entries).
pub const MAX_REPLY: usize = 256 << 20;
/// Descriptors one message may carry.
const MAX_FDS: usize = 4;

pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    max_line: usize,
}

impl Conn {
    /// A connection that reads lines of at most [`MAX_LINE`] bytes.
    pub fn new(stream: UnixStream) -> Conn {
        Conn { stream, buf: Vec::new(), fds: VecDeque::new(), max_line: MAX_LINE }
    }

    /// A client's connection, which reads replies of up to [`MAX_REPLY`] bytes.
    pub fn client(stream: UnixStream) -> Conn {
        Conn { max_line: MAX_REPLY, ..Conn::new(stream) }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `msg` as one line, with `fd` beside it.
    pub async fn send<T: Serialize>(&mut self, msg: &T, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut sent = 0;
        let mut fd = fd.map(|f| f.as_raw_fd());
        while sent < line.len() {
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || send_with_fd(self.stream.as_raw_fd(), &line[sent..], fd))
                .await?;
            // The descriptor went with the first bytes.
            fd = None;
            sent += n;
        }
        Ok(())
    }

    /// The next line, parsed; `None` when the other side closed the connection between lines.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")));
            }
            if self.buf.len() > self.max_line {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "message too long"));
            }
            let mut chunk = [0u8; 16 << 10];
            let fds = &mut self.fds;
            let raw = self.stream.as_raw_fd();
            let n = self.stream.async_io(Interest::READABLE, || recv_with_fds(raw, &mut chunk, fds)).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message"))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if self.fds.len() > MAX_FDS {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "too many descriptors"));
            }
        }
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }
}

/// Room for the control message of [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 64]);

fn send_with_fd(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut control = ControlBuf([0; 64]);
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call, and
    // the control message is written inside `control`, which CMSG_SPACE(4) bytes fit.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            let len = std::mem::size_of::<RawFd>() as u32;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = ControlBuf([0; 64]);
    // SAFETY: as in `send_with_fd`; the kernel writes at most msg_controllen bytes of control
    // messages into `control`, and the descriptors it installs are ours to own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push_back(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "too many descriptors"));
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn a_descriptor_crosses_with_its_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed").unwrap();
        a.send(&serde_json::json!({"op": "x"}), Some(file.as_fd())).await.unwrap();
        a.send(&serde_json::json!({"op": "y"}), None).await.unwrap();
        let first: serde_json::Value = b.recv().await.unwrap().unwrap();
        assert_eq!(first["op"], "x");
        let mut got = std::fs::File::from(b.take_fd().expect("a descriptor"));
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "passed");
        let second: serde_json::Value = b.recv().await.unwrap().unwrap();
        assert_eq!(second["op"], "y");
        assert!(b.take_fd().is_none());
        drop(a);
        assert!(b.recv::<serde_json::Value>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Conn::new(b);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut a = a;
            let junk = vec![b'x'; 64 << 10];
            for _ in 0..20 {
                if a.write_all(&junk).await.is_err() {
                    break;
                }
            }
        });
        let err = b.recv::<serde_json::Value>().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(b);
        writer.await.unwrap();
    }
}
