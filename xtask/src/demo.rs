pub fn run(_agent: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
