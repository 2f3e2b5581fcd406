//! The link code `SSSS-PPPPPP` (PROTOCOL.md E13.1): the server's slot and the secret the
//! existing device draws, how it is printed, and how a typed code is read.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::{LinkError, MAX_LINK_SLOT};
use crate::e2e::{OsRandom, SecretSource};

/// Number of secrets (6 decimal digits).
pub(super) const SECRET_RANGE: u32 = 1_000_000;
/// Uniform draws: a u32 below this (a multiple of 10^6) is taken modulo 10^6.
pub(super) const SECRET_DRAW_BOUND: u32 = 4_294_000_000;

/// The 6-digit secret half of a link code, drawn by the existing device and never sent.
///
/// Zeroized on drop; `Debug` prints a mask.
#[derive(Clone)]
pub struct LinkSecret(pub(super) u32);

impl Drop for LinkSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkSecret(******)")
    }
}

impl LinkSecret {
    /// A uniformly drawn secret from the operating system's CSPRNG.
    pub fn draw() -> Result<Self, LinkError> {
        Self::draw_with(&mut OsRandom)
    }

    /// A uniformly drawn secret: rejection sampling of u32s (big-endian, 4 bytes at a time)
    /// below 4,294,000,000, then modulo 10^6.
    pub fn draw_with(source: &mut impl SecretSource) -> Result<Self, LinkError> {
        loop {
            let bytes = Zeroizing::new(source.secret_bytes().map_err(LinkError::Random)?);
            for chunk in bytes.chunks_exact(4) {
                let mut word = [0u8; 4];
                word.copy_from_slice(chunk);
                let mut draw = u32::from_be_bytes(word);
                word.zeroize();
                if draw < SECRET_DRAW_BOUND {
                    let secret = Self(draw % SECRET_RANGE);
                    draw.zeroize();
                    return Ok(secret);
                }
            }
        }
    }

    /// The secret given as a number below 10^6.
    pub fn new(secret: u32) -> Result<Self, LinkError> {
        if secret >= SECRET_RANGE {
            return Err(LinkError::CodeRange);
        }
        Ok(Self(secret))
    }

    /// The SPAKE2 password: the 6 digits in ASCII, leading zeros kept.
    pub(super) fn password(&self) -> Zeroizing<[u8; 6]> {
        let mut out = Zeroizing::new([0u8; 6]);
        let mut rest = self.0;
        for digit in out.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out
    }
}

/// What the user carries from one device to the other: `SSSS-PPPPPP`, a 4-digit slot the
/// server chose (it routes `link_join` to the right link) and the 6-digit [`LinkSecret`].
///
/// `Display` prints the whole code (to show the user); `Debug` masks the secret.
#[derive(Clone)]
pub struct LinkCode {
    slot: u16,
    secret: LinkSecret,
}

impl fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkCode({:04}-******)", self.slot)
    }
}

impl fmt::Display for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:06}", self.slot, self.secret.0)
    }
}

impl LinkCode {
    /// The code of `slot` (from the server's `link_opened`) and the secret drawn before.
    pub fn new(slot: u16, secret: &LinkSecret) -> Result<Self, LinkError> {
        if slot > MAX_LINK_SLOT {
            return Err(LinkError::CodeRange);
        }
        Ok(Self {
            slot,
            secret: secret.clone(),
        })
    }

    /// Reads a typed code: 10 digits, spaces anywhere, and at most one dash, after the 4th
    /// digit (`4821-730195`, `4821730195`, `4821 730 195`).
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let mut digits = Zeroizing::new([0u8; 10]);
        let mut count = 0;
        let mut dashed = false;
        for c in text.chars() {
            if c.is_whitespace() {
                continue;
            }
            if c == '-' {
                if dashed || count != 4 {
                    return Err(LinkError::CodeSyntax);
                }
                dashed = true;
                continue;
            }
            // `to_digit` takes only ASCII 0-9: no other script's digits slip in.
            let digit = c.to_digit(10).ok_or(LinkError::CodeSyntax)?;
            let slot = digits.get_mut(count).ok_or(LinkError::CodeLength)?;
            *slot = digit as u8;
            count += 1;
        }
        if count != digits.len() {
            return Err(LinkError::CodeLength);
        }
        let slot = digits[..4]
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(*d));
        let secret = digits[4..]
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(*d));
        Ok(Self {
            slot,
            secret: LinkSecret(secret),
        })
    }

    /// The server's routing slot (public).
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The secret half.
    pub fn secret(&self) -> &LinkSecret {
        &self.secret
    }
}
