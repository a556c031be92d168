//! The `RESULT name PASS|FAIL detail` lines the VM tests print (counted by
//! tests/passthrough/run.sh), shared by the examples that run in its VMs.

/// Failed checks so far.
pub struct Results {
    pub failed: usize,
}

impl Results {
    /// Prints one check's line and counts a failure.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        println!(
            "RESULT {name} {} {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            self.failed += 1;
        }
    }
}
