//! order.toml and what detection does with it before any `bin/detect` runs: reading the
//! order, expanding composite buildpacks into the flat groups the reference lifecycle tries
//! (`phase/detector.go`), and matching buildpacks' targets against the run image's
//! (`platform/target_data.go`).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::Path;

use serde::Deserialize;

use super::descriptor::{Buildpack, OrderEntry, Target};
use super::{Distro, LifecycleError, TargetData};

/// The groups detection may choose from, in the order they are tried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Order {
    pub groups: Vec<Vec<OrderEntry>>,
    /// `[[order-extensions]]`: image extensions, which lathe refuses to run.
    pub extensions: Vec<Vec<OrderEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawOrder {
    #[serde(default)]
    order: Vec<RawGroup>,
    #[serde(default)]
    order_extensions: Vec<RawGroup>,
}

#[derive(Deserialize)]
struct RawGroup {
    #[serde(default)]
    group: Vec<OrderEntry>,
}

/// Reads order.toml (`[[order]]`/`[[order.group]]`, `[[order-extensions]]`/
/// `[[order-extensions.group]]`).
pub fn read_order(path: &Path) -> Result<Order, LifecycleError> {
    let bad = |why: String| LifecycleError::Detect(format!("{}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let raw: RawOrder = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    Ok(Order {
        groups: raw.order.into_iter().map(|g| g.group).collect(),
        extensions: raw.order_extensions.into_iter().map(|g| g.group).collect(),
    })
}

/// An order of one group, as `--buildpack` gives it.
pub fn from_group(entries: Vec<OrderEntry>) -> Order {
    Order {
        groups: vec![entries],
        extensions: Vec::new(),
    }
}

/// A component buildpack of an expanded group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupEntry {
    pub buildpack: Buildpack,
    pub optional: bool,
}

/// Expands one order group into the flat groups of component buildpacks it stands for and
/// hands each to `visit`, in the order the reference lifecycle tries them, until `visit`
/// breaks: a composite buildpack is replaced in place by each group of its own order in
/// turn (depth-first, so the groups come out as a cartesian product), followed, when the
/// composite's entry is optional, by the group without it; an entry whose id already
/// appears earlier in the flat group is dropped. Optional component entries stay in the
/// group marked optional: detection, not expansion, decides whether they take part.
///
/// Buildpacks are looked up as they are reached, so an entry after a group that passes is
/// never looked up (as in LC, where a missing buildpack there is no error).
pub fn expand<B>(
    group: &[OrderEntry],
    lookup: &mut impl FnMut(&OrderEntry) -> Result<Buildpack, LifecycleError>,
    visit: &mut impl FnMut(Vec<GroupEntry>) -> Result<ControlFlow<B>, LifecycleError>,
) -> Result<ControlFlow<B>, LifecycleError> {
    let mut composites = Vec::new();
    walk(Vec::new(), group.to_vec(), &mut composites, lookup, visit)
}

/// Every flat group of every order group, in the order they would be tried.
pub fn expand_all(
    groups: &[Vec<OrderEntry>],
    mut lookup: impl FnMut(&OrderEntry) -> Result<Buildpack, LifecycleError>,
) -> Result<Vec<Vec<GroupEntry>>, LifecycleError> {
    let mut flat = Vec::new();
    for group in groups {
        let flow: ControlFlow<()> = expand(group, &mut lookup, &mut |g| {
            flat.push(g);
            Ok(ControlFlow::Continue(()))
        })?;
        debug_assert!(flow.is_continue());
    }
    Ok(flat)
}

/// `done` is the flat group so far; `rest` the entries still to place. `composites` holds
/// the composites being expanded, to refuse an order that contains itself.
fn walk<B>(
    mut done: Vec<GroupEntry>,
    rest: Vec<OrderEntry>,
    composites: &mut Vec<String>,
    lookup: &mut impl FnMut(&OrderEntry) -> Result<Buildpack, LifecycleError>,
    visit: &mut impl FnMut(Vec<GroupEntry>) -> Result<ControlFlow<B>, LifecycleError>,
) -> Result<ControlFlow<B>, LifecycleError> {
    for (i, entry) in rest.iter().enumerate() {
        if done.iter().any(|d| d.buildpack.id == entry.id) {
            continue;
        }
        let buildpack = lookup(entry)?;
        if buildpack.is_composite() {
            let name = buildpack.name_version();
            if composites.contains(&name) {
                return Err(LifecycleError::Detect(format!(
                    "composite buildpack {name} contains itself (through {})",
                    composites.join(" → ")
                )));
            }
            let tail = &rest[i + 1..];
            composites.push(name);
            for inner in &buildpack.order {
                let next: Vec<OrderEntry> = inner.iter().chain(tail).cloned().collect();
                let flow = walk(done.clone(), next, composites, lookup, visit)?;
                if flow.is_break() {
                    composites.pop();
                    return Ok(flow);
                }
            }
            composites.pop();
            if entry.optional {
                return walk(done, tail.to_vec(), composites, lookup, visit);
            }
            return Ok(ControlFlow::Continue(()));
        }
        done.push(GroupEntry {
            buildpack,
            optional: entry.optional,
        });
    }
    visit(done)
}

/// The run image's target as detection matches against it and shows it to buildpacks: an
/// empty os is `linux`, an empty arch the lifecycle's own, and a missing distro comes from
/// the build container's os-release (`ID`, `VERSION_ID`).
pub fn build_target(run_image: &TargetData, os_release: &Path) -> TargetData {
    let mut target = run_image.clone();
    if target.os.is_empty() {
        target.os = "linux".into();
    }
    if target.arch.is_empty() {
        target.arch = host_arch().into();
    }
    if target.distro.is_none() {
        target.distro = read_os_release(os_release);
    }
    target
}

/// The distro an os-release file names; none when it can't be read or names neither.
pub fn read_os_release(path: &Path) -> Option<Distro> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut distro = Distro::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        match key.trim() {
            "ID" => distro.name = value.to_string(),
            "VERSION_ID" => distro.version = value.to_string(),
            _ => {}
        }
    }
    (!distro.name.is_empty() || !distro.version.is_empty()).then_some(distro)
}

/// This machine's architecture in the Go/OCI vocabulary targets use.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// Whether `buildpack` may run against the run image: `run_image` is the target as analyzed
/// (a wholly empty one matches everything), `base` the same after [`build_target`]. A
/// buildpack without targets, or with one that names neither os nor arch, matches anything.
pub fn supports_target(run_image: &TargetData, base: &TargetData, buildpack: &Buildpack) -> bool {
    if run_image.os.is_empty() && run_image.arch.is_empty() {
        return true;
    }
    if buildpack.targets.is_empty()
        || buildpack
            .targets
            .iter()
            .any(|t| is_empty(&t.os) && is_empty(&t.arch))
    {
        return true;
    }
    buildpack.targets.iter().any(|t| target_satisfied(base, t))
}

/// LC's detect-time rule: os, arch and variant each equal or empty on either side; a target
/// that lists distros needs the base to have one matching (name and version each equal or
/// empty on either side).
pub fn target_satisfied(base: &TargetData, target: &Target) -> bool {
    let field = |ours: &str, theirs: &Option<String>| {
        let theirs = theirs.as_deref().unwrap_or("");
        ours.is_empty() || theirs.is_empty() || ours == theirs
    };
    if !field(&base.os, &target.os)
        || !field(&base.arch, &target.arch)
        || !field(base.variant.as_deref().unwrap_or(""), &target.variant)
    {
        return false;
    }
    if target.distros.is_empty() {
        return true;
    }
    let Some(distro) = &base.distro else {
        return false;
    };
    target
        .distros
        .iter()
        .any(|d| field(&distro.name, &d.name) && field(&distro.version, &d.version))
}

fn is_empty(value: &Option<String>) -> bool {
    value.as_deref().unwrap_or("").is_empty()
}

/// Ids listed in the extensions order, for the refusal message.
pub(crate) fn extension_names(order: &Order) -> Vec<String> {
    let mut seen = HashSet::new();
    order
        .extensions
        .iter()
        .flatten()
        .map(|e| format!("{}@{}", e.id, e.version))
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::ApiVersion;
    use super::super::descriptor::TargetDistro;
    use super::*;
    use std::collections::HashMap;

    fn entry(id: &str, optional: bool) -> OrderEntry {
        OrderEntry {
            id: id.into(),
            version: "1".into(),
            optional,
        }
    }

    fn component(id: &str) -> Buildpack {
        Buildpack {
            dir: format!("/cnb/buildpacks/{id}/1").into(),
            api: ApiVersion::new(0, 10),
            id: id.into(),
            version: "1".into(),
            name: None,
            homepage: None,
            clear_env: false,
            sbom_formats: Vec::new(),
            exec_env: Vec::new(),
            targets: Vec::new(),
            declared_targets: Vec::new(),
            order: Vec::new(),
        }
    }

    fn composite(id: &str, order: Vec<Vec<OrderEntry>>) -> Buildpack {
        Buildpack {
            order,
            ..component(id)
        }
    }

    /// The flat groups as `id` or `id?` (optional) strings.
    fn expanded(groups: &[Vec<OrderEntry>], store: &[Buildpack]) -> Vec<String> {
        let by_id: HashMap<&str, &Buildpack> = store.iter().map(|b| (b.id.as_str(), b)).collect();
        expand_all(groups, |e| {
            by_id
                .get(e.id.as_str())
                .map(|b| (*b).clone())
                .ok_or_else(|| LifecycleError::Detect(format!("no {}", e.id)))
        })
        .unwrap()
        .iter()
        .map(|g| {
            g.iter()
                .map(|e| format!("{}{}", e.buildpack.id, if e.optional { "?" } else { "" }))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
    }

    #[test]
    fn reads_order_toml_with_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.toml");
        std::fs::write(
            &path,
            r#"
[[order]]
[[order.group]]
id = "a"
version = "1"
[[order.group]]
id = "b"
optional = true

[[order]]
[[order.group]]
id = "c"
version = "3"

[[order-extensions]]
[[order-extensions.group]]
id = "ext/curl"
version = "0.1"
"#,
        )
        .unwrap();
        let order = read_order(&path).unwrap();
        assert_eq!(
            order.groups,
            [
                vec![
                    entry("a", false),
                    OrderEntry {
                        id: "b".into(),
                        version: String::new(),
                        optional: true
                    }
                ],
                vec![OrderEntry {
                    id: "c".into(),
                    version: "3".into(),
                    optional: false
                }]
            ]
        );
        assert_eq!(extension_names(&order), ["ext/curl@0.1"]);

        let missing = read_order(&dir.path().join("absent.toml")).unwrap_err();
        assert_eq!(missing.exit_code(), 22);
        std::fs::write(&path, "[[order]]\ngroup = 3\n").unwrap();
        assert_eq!(read_order(&path).unwrap_err().exit_code(), 22);
    }

    #[test]
    fn from_group_is_one_group() {
        let order = from_group(vec![entry("a", false)]);
        assert_eq!(order.groups, [vec![entry("a", false)]]);
        assert!(order.extensions.is_empty());
    }

    #[test]
    fn plain_groups_stay_as_they_are_with_optional_marked() {
        let store = [component("a"), component("b")];
        assert_eq!(
            expanded(
                &[
                    vec![entry("a", false), entry("b", true)],
                    vec![entry("b", false)]
                ],
                &store
            ),
            ["a b?", "b"]
        );
    }

    #[test]
    fn composites_expand_in_place_as_a_cartesian_product() {
        let store = [
            component("a"),
            component("b"),
            component("c"),
            component("d"),
            component("z"),
            composite("x", vec![vec![entry("a", false)], vec![entry("b", true)]]),
            composite("y", vec![vec![entry("c", false)], vec![entry("d", false)]]),
        ];
        assert_eq!(
            expanded(
                &[vec![
                    entry("x", false),
                    entry("y", false),
                    entry("z", false)
                ]],
                &store
            ),
            ["a c z", "a d z", "b? c z", "b? d z"]
        );
    }

    #[test]
    fn an_optional_composite_also_yields_the_group_without_it() {
        let store = [
            component("a"),
            component("b"),
            component("z"),
            composite("x", vec![vec![entry("a", false)], vec![entry("b", false)]]),
        ];
        assert_eq!(
            expanded(&[vec![entry("x", true), entry("z", false)]], &store),
            ["a z", "b z", "z"]
        );
    }

    #[test]
    fn nested_composites_expand_depth_first() {
        let store = [
            component("a"),
            component("b"),
            component("c"),
            composite(
                "inner",
                vec![vec![entry("a", false)], vec![entry("b", false)]],
            ),
            composite(
                "outer",
                vec![
                    vec![entry("inner", false), entry("c", false)],
                    vec![entry("c", false)],
                ],
            ),
        ];
        assert_eq!(
            expanded(&[vec![entry("outer", false)]], &store),
            ["a c", "b c", "c"]
        );
    }

    #[test]
    fn an_id_already_in_the_group_is_dropped() {
        let store = [
            component("a"),
            component("b"),
            composite("x", vec![vec![entry("a", false), entry("b", false)]]),
        ];
        assert_eq!(
            expanded(
                &[vec![entry("a", true), entry("x", false), entry("a", false)]],
                &store
            ),
            ["a? b"]
        );
    }

    #[test]
    fn a_composite_containing_itself_is_refused() {
        let looping = composite("x", vec![vec![entry("x", false)]]);
        let err = expand_all(&[vec![entry("x", false)]], |_| Ok(looping.clone())).unwrap_err();
        assert_eq!(err.exit_code(), 22);
        assert!(err.to_string().contains("contains itself"), "{err}");
    }

    #[test]
    fn expansion_stops_looking_up_once_visit_breaks() {
        let store = [
            component("a"),
            composite(
                "x",
                vec![vec![entry("a", false)], vec![entry("missing", false)]],
            ),
        ];
        let mut looked_up = Vec::new();
        let flow = expand(
            &[entry("x", false)],
            &mut |e: &OrderEntry| {
                looked_up.push(e.id.clone());
                store
                    .iter()
                    .find(|b| b.id == e.id)
                    .cloned()
                    .ok_or_else(|| LifecycleError::Detect(e.id.clone()))
            },
            &mut |g: Vec<GroupEntry>| Ok(ControlFlow::Break(g.len())),
        )
        .unwrap();
        assert_eq!(flow, ControlFlow::Break(1));
        assert_eq!(looked_up, ["x", "a"]);
    }

    fn target(os: &str, arch: &str) -> TargetData {
        TargetData {
            os: os.into(),
            arch: arch.into(),
            ..TargetData::default()
        }
    }

    fn declared(os: Option<&str>, arch: Option<&str>) -> Target {
        Target {
            os: os.map(String::from),
            arch: arch.map(String::from),
            ..Target::default()
        }
    }

    #[test]
    fn build_target_fills_os_arch_and_distro() {
        let dir = tempfile::tempdir().unwrap();
        let os_release = dir.path().join("os-release");
        std::fs::write(
            &os_release,
            "NAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nID_LIKE=debian\n",
        )
        .unwrap();
        let filled = build_target(&TargetData::default(), &os_release);
        assert_eq!(filled.os, "linux");
        assert_eq!(filled.arch, host_arch());
        assert_eq!(
            filled.distro,
            Some(Distro {
                name: "ubuntu".into(),
                version: "22.04".into()
            })
        );

        let labelled = TargetData {
            distro: Some(Distro {
                name: "debian".into(),
                version: "12".into(),
            }),
            variant: Some("v8".into()),
            ..target("linux", "arm64")
        };
        assert_eq!(build_target(&labelled, &os_release), labelled);
        assert_eq!(
            build_target(&target("linux", "arm64"), &dir.path().join("absent")).distro,
            None
        );
        std::fs::write(&os_release, "NAME=x\n").unwrap();
        assert_eq!(read_os_release(&os_release), None);
    }

    #[test]
    fn host_arch_uses_go_names() {
        let expected = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            _ => return,
        };
        assert_eq!(host_arch(), expected);
    }

    #[test]
    fn os_arch_and_variant_match_when_equal_or_empty() {
        let base = TargetData {
            variant: Some("v8".into()),
            ..target("linux", "arm64")
        };
        assert!(target_satisfied(
            &base,
            &declared(Some("linux"), Some("arm64"))
        ));
        assert!(target_satisfied(&base, &declared(Some("linux"), None)));
        assert!(target_satisfied(&base, &declared(None, Some("arm64"))));
        assert!(!target_satisfied(
            &base,
            &declared(Some("linux"), Some("amd64"))
        ));
        assert!(!target_satisfied(&base, &declared(Some("windows"), None)));
        let v7 = Target {
            variant: Some("v7".into()),
            ..declared(Some("linux"), Some("arm64"))
        };
        assert!(!target_satisfied(&base, &v7));
        let no_variant = target("linux", "arm64");
        assert!(target_satisfied(&no_variant, &v7));
    }

    #[test]
    fn listed_distros_need_a_matching_base_distro() {
        let with_distros = Target {
            distros: vec![
                TargetDistro {
                    name: Some("ubuntu".into()),
                    version: Some("18.04".into()),
                },
                TargetDistro {
                    name: Some("debian".into()),
                    version: None,
                },
            ],
            ..declared(Some("linux"), None)
        };
        let on = |name: &str, version: &str| TargetData {
            distro: Some(Distro {
                name: name.into(),
                version: version.into(),
            }),
            ..target("linux", "amd64")
        };
        assert!(target_satisfied(&on("ubuntu", "18.04"), &with_distros));
        assert!(target_satisfied(&on("debian", "12"), &with_distros));
        assert!(!target_satisfied(&on("ubuntu", "22.04"), &with_distros));
        assert!(target_satisfied(&on("ubuntu", ""), &with_distros));
        assert!(!target_satisfied(&target("linux", "amd64"), &with_distros));
        assert!(target_satisfied(
            &target("linux", "amd64"),
            &declared(Some("linux"), None)
        ));
    }

    #[test]
    fn buildpacks_match_through_wildcards_or_any_target() {
        let base = target("linux", "amd64");
        let with = |targets: Vec<Target>| Buildpack {
            targets,
            ..component("a")
        };
        assert!(supports_target(&base, &base, &with(vec![])));
        assert!(supports_target(
            &base,
            &base,
            &with(vec![
                declared(Some("linux"), Some("arm64")),
                declared(None, Some("amd64"))
            ])
        ));
        let arm_only = with(vec![declared(Some("linux"), Some("arm64"))]);
        assert!(!supports_target(&base, &base, &arm_only));
        assert!(
            supports_target(&TargetData::default(), &base, &arm_only),
            "an empty run-image target matches everything"
        );
        let distro_wildcard = with(vec![Target {
            distros: vec![TargetDistro {
                name: Some("alpine".into()),
                version: None,
            }],
            ..Target::default()
        }]);
        assert!(
            supports_target(&base, &base, &distro_wildcard),
            "LC: a target without os and arch is a wildcard"
        );
    }
}
