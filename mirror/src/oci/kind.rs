//! The two kinds of content a digest names in the pull API.

/// What a request is for: a blob (a layer, a config) or a manifest (or an index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentKind {
    Blob,
    Manifest,
}

impl ContentKind {
    /// The path segment after `/v2/<name>/`.
    pub fn path_segment(self) -> &'static str {
        match self {
            ContentKind::Blob => "blobs",
            ContentKind::Manifest => "manifests",
        }
    }
}
