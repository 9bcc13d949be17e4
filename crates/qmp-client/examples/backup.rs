use qmp_api::{BlockJobStatus, BlockdevBackup, BlockdevBackupArguments, MirrorSyncMode};
use std::time::Duration;

#[tokio::main]
async fn main() -> qmp_client::Result<()> {
    let client = qmp_client::Client::connect_unix("blockjobd.sock").await?;
    let mut backup = BlockdevBackup::new("disk0", MirrorSyncMode::Full, "backup0");
    backup.job_id = Some("job0".into());
    // Listen first, then start: the whole life of the job is seen.
    let mut progress = client.follow_job::<BlockJobStatus>("job0", Duration::from_millis(200));
    client.execute(BlockdevBackupArguments(backup)).await?;
    while let Some(job) = progress.next().await.transpose()? {
        println!("{} {:.0}%", job.status, job.fraction() * 100.0);
        if let Some(error) = job.error {
            eprintln!("backup failed: {error}");
        }
    }
    Ok(())
}
