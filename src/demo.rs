//! The built-in demo (`loraplex demo`): being built.

use crate::cli::DemoArgs;

pub fn run(_args: &DemoArgs) -> Result<(), crate::Error> {
    Err(crate::Error::internal("the demo is not built yet"))
}
