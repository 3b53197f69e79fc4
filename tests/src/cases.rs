//! Generated test cases that are the same in every run.

/// A small deterministic generator (xorshift64*): generated cases that are the same in every run.
pub struct Cases(pub u64);

impl Cases {
    pub fn number(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.number() % n
    }
    /// Text of `len` characters: ASCII, accented, CJK, emoji, the separators MQTT topics use.
    pub fn text(&mut self, len: usize) -> String {
        const CHARS: [char; 12] = ['a', 'Z', '0', ' ', '/', '+', '#', 'é', 'ß', '中', '☃', '🦀'];
        (0..len).map(|_| CHARS[self.below(CHARS.len() as u64) as usize]).collect()
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| if self.below(4) == 0 { 0 } else { self.number() as u8 }).collect()
    }
    /// A length, now and then the largest an MQTT string or binary field holds.
    pub fn length(&mut self) -> usize {
        match self.below(10) {
            0 => 0,
            1 => 65_535,
            _ => self.below(40) as usize,
        }
    }
}

impl Cases {
    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}
