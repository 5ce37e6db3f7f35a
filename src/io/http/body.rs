//! A response body read as a stream (compressed downloads, tar files, servers without
//! range support), resumed after a dropped connection.
//!
//! When the connection drops, stalls past the read timeout, or the body ends before its
//! `Content-Length`, the rest is asked for with `Range: bytes=POS-` and a precondition
//! on the first response's ETag / Last-Modified. The resumed response must be a 206
//! starting exactly at POS, with the same total length and validator — else the object
//! changed and the read fails, so bytes of two versions are never joined. Without range
//! support or without a validator there is no safe resume: the read fails, naming the
//! byte where the connection was lost. Resumes are bounded: at most `retries` in a row
//! without 1 MiB of progress in between, and 100 in all.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use super::{
    changed_error, content_length, content_range, header, status_error, Client, Failure, Validator,
};
use crate::error::{Error, Result};
use crate::io::compressed::to_io;
use crate::io::remote::redact;

/// Progress that resets the count of resumes in a row.
const PROGRESS_RESET: u64 = 1 << 20;
/// Most resumes of one body.
const MAX_RESUMES: u32 = 100;

/// A response body read as a stream, resumed where possible.
pub struct ResumableBody {
    client: Arc<Client>,
    url: String,
    /// Headers sent with every request (e.g. a registry token).
    headers: Vec<(&'static str, String)>,
    reader: Option<ureq::BodyReader<'static>>,
    /// Bytes of the object delivered so far.
    pos: u64,
    /// The object's length, when the server said.
    total: Option<u64>,
    validator: Validator,
    /// The server takes ranges and the object has a validator.
    resumable: bool,
    /// Resumes in a row, and `pos` at the last one.
    streak: u32,
    streak_pos: u64,
    resumes: u32,
    pause: Duration,
}

impl ResumableBody {
    /// Starts reading `url` from its first byte.
    pub fn open(client: Arc<Client>, url: &str) -> Result<Self> {
        Self::open_with(client, url, Vec::new())
    }

    /// Starts reading `url` from its first byte, sending `headers` with every request.
    pub fn open_with(
        client: Arc<Client>,
        url: &str,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Self> {
        let resp = client.get(url, &headers)?;
        let mut body = Self::from_response(client, url, resp)?;
        body.headers = headers;
        Ok(body)
    }

    /// Continues the body of `resp` (a 200, or a 206 from byte 0), the first response
    /// for `url`.
    pub fn from_response(
        client: Arc<Client>,
        url: &str,
        resp: ureq::http::Response<ureq::Body>,
    ) -> Result<Self> {
        let headers = resp.headers();
        let validator = Validator::of(headers);
        let (total, ranges) = if resp.status().as_u16() == 206 {
            match content_range(headers) {
                Some((0, _, total)) => (total, true),
                _ => {
                    return Err(Error::Http {
                        url: redact(url),
                        status: Some(206),
                        reason: "bad range response: it does not start at byte 0".into(),
                    })
                }
            }
        } else {
            let ranges = header(headers, "accept-ranges")
                .is_some_and(|v| v.to_ascii_lowercase().contains("bytes"));
            (content_length(headers), ranges)
        };
        let pause = client.options().retry_pause;
        Ok(ResumableBody {
            resumable: ranges && validator.is_some(),
            client,
            url: url.to_string(),
            headers: Vec::new(),
            reader: Some(resp.into_body().into_reader()),
            pos: 0,
            total,
            validator,
            streak: 0,
            streak_pos: 0,
            resumes: 0,
            pause,
        })
    }

    /// The object's length, when the server gave it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The validator (ETag / Last-Modified) of the first response.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Bytes delivered so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Asks for the rest from `pos`.
    fn reopen(&mut self) -> std::result::Result<(), Failure> {
        let mut headers = self.headers.clone();
        headers.push(("Range", format!("bytes={}-", self.pos)));
        headers.extend(self.validator.precondition());
        let url = self.url.as_str();
        let resp = self.client.send("GET", url, &headers)?;
        match resp.status().as_u16() {
            206 => {}
            412 => return Err(Failure::Final(changed_error(url))),
            s if s >= 500 || s == 408 || s == 429 => {
                return Err(Failure::Transient(status_error(url, resp)))
            }
            200 => {
                return Err(Failure::Final(Error::Http {
                    url: redact(url),
                    status: Some(200),
                    reason: "the server ignored the range asked for to resume".into(),
                }))
            }
            _ => return Err(Failure::Final(status_error(url, resp))),
        }
        self.validator
            .check(resp.headers(), url)
            .map_err(Failure::Final)?;
        match content_range(resp.headers()) {
            Some((a, _, t)) if a == self.pos && (self.total.is_none() || t == self.total) => {}
            _ => return Err(Failure::Final(changed_error(url))),
        }
        self.reader = Some(resp.into_body().into_reader());
        Ok(())
    }

    /// After a failure at `pos`: resumes, or says why it cannot.
    fn recover(&mut self, why: String) -> io::Result<()> {
        self.reader = None;
        let shown = redact(&self.url);
        let fail = |reason: String| {
            Err(to_io(Error::Http {
                url: shown.clone(),
                status: None,
                reason,
            }))
        };
        let at = match self.total {
            Some(t) => format!("at byte {} of {t}", self.pos),
            None => format!("at byte {}", self.pos),
        };
        if !self.resumable {
            return fail(format!(
                "the transfer broke {at} ({why}) and cannot be resumed (the server offers no ranges or no ETag/Last-Modified)"
            ));
        }
        if self.pos - self.streak_pos >= PROGRESS_RESET {
            self.streak = 0;
        }
        loop {
            if self.streak >= self.client.options().retries || self.resumes >= MAX_RESUMES {
                return fail(format!(
                    "the transfer broke {at} ({why}); gave up after {} resumes",
                    self.resumes
                ));
            }
            self.streak += 1;
            self.resumes += 1;
            self.streak_pos = self.pos;
            std::thread::sleep(self.pause);
            self.pause = (self.pause * 2).min(super::MAX_PAUSE);
            match self.reopen() {
                Ok(()) => {
                    self.pause = self.client.options().retry_pause;
                    return Ok(());
                }
                Err(Failure::Transient(_)) => continue,
                Err(Failure::Final(e)) => return Err(to_io(e)),
            }
        }
    }
}

impl Read for ResumableBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(r) = self.reader.as_mut() else {
                if self.total.is_some_and(|t| self.pos >= t) {
                    return Ok(0);
                }
                self.recover("no connection".into())?;
                continue;
            };
            match r.read(buf) {
                Ok(0) => match self.total {
                    Some(t) if self.pos < t => {
                        self.recover(format!("the body ended {} bytes early", t - self.pos))?
                    }
                    _ => return Ok(0),
                },
                Ok(n) => {
                    self.pos += n as u64;
                    if self.total.is_some_and(|t| self.pos > t) {
                        return Err(to_io(Error::Http {
                            url: redact(&self.url),
                            status: None,
                            reason: "the body is longer than its declared length".into(),
                        }));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.recover(e.to_string())?,
            }
        }
    }
}
