//! `migratekit`: the test stand-in. See `migratekit_standin::Options` for its flags.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options =
        migratekit_standin::Options::parse(&args, std::env::var("MIGRATEKIT_JOB_ID").ok())?;
    migratekit_standin::run(&options)
}
