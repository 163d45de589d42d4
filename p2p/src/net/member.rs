//! What this node shows a scheduler with every call: the host id it acts as, its owner token
//! and, in a cluster with a secret, a fresh membership proof (see `damselfly_proto::member`).

use damselfly_proto::member::{JoinKey, OwnerToken, HOST_HEADER, OWNER_HEADER, PROOF_HEADER};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::NetError;

#[derive(Clone)]
pub(crate) struct Membership {
    host_id: String,
    owner: OwnerToken,
    host_value: AsciiMetadataValue,
    owner_value: AsciiMetadataValue,
    /// `None` in an insecure cluster: calls carry no proof.
    join: Option<JoinKey>,
}

impl Membership {
    pub fn new(host_id: &str, owner: &OwnerToken, secret: Option<&[u8]>) -> Result<Self, NetError> {
        let host_value = AsciiMetadataValue::try_from(host_id)
            .map_err(|_| NetError::Config(format!("host id {host_id:?} is not printable ASCII")))?;
        let owner_value = AsciiMetadataValue::try_from(owner.to_hex())
            .map_err(|_| NetError::Config("owner token is not ASCII".to_owned()))?;
        Ok(Membership {
            host_id: host_id.to_owned(),
            owner: owner.clone(),
            host_value,
            owner_value,
            join: secret.map(JoinKey::new),
        })
    }
}

impl Interceptor for Membership {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        md.insert(HOST_HEADER, self.host_value.clone());
        md.insert(OWNER_HEADER, self.owner_value.clone());
        if let Some(join) = &self.join {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let proof = join.prove(&self.host_id, &self.owner, now);
            let value = AsciiMetadataValue::try_from(proof).map_err(|_| Status::internal("membership proof"))?;
            md.insert(PROOF_HEADER, value);
        }
        Ok(req)
    }
}
