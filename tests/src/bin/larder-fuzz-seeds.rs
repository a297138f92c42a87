//! Writes the fuzz targets' seed inputs, made by the real code, into `fuzz/corpus/<target>/`
//! (`scripts/fuzz.sh` runs it before fuzzing).

fn main() -> anyhow::Result<()> {
    let root = larder_tests::fuzz::fuzz_dir().join("corpus");
    let mut written = 0;
    for (i, (target, input)) in larder_tests::fuzz::seeds()?.into_iter().enumerate() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{i:02}")), input)?;
        written += 1;
    }
    println!("{written} seeds written under {}", root.display());
    Ok(())
}
