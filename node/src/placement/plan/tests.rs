//! The planner's decisions on small hand-made clusters.

use super::*;

fn node(id: u64, state: NodeState) -> NodeInfo {
    NodeInfo {
        id,
        state,
        weight: 100,
        domain: String::new(),
        live: state != NodeState::Down && state != NodeState::Out,
        heard: state != NodeState::Down && state != NodeState::Out,
        nearfull: false,
    }
}

fn group(id: u64, voters: &[u64], leader: u64) -> GroupInfo {
    GroupInfo {
        id,
        leader,
        conf_ver: 1,
        voters: voters.to_vec(),
        learners: vec![],
        voters_outgoing: vec![],
        progress: voters
            .iter()
            .filter(|v| **v != leader)
            .map(|v| (*v, 100, "replicate".to_string()))
            .collect(),
        commit: 100,
        want: 3,
        stalled: vec![],
    }
}

const LIMITS: Limits = Limits {
    moves_per_node_max: 2,
    moves_max: 16,
    rebalance: true,
};

#[test]
fn an_out_node_is_replaced_learner_first_then_joint_then_leave() {
    let nodes = [
        node(1, NodeState::Up),
        node(2, NodeState::Up),
        node(3, NodeState::Out),
        node(4, NodeState::Up),
    ];
    let g = group(7, &[1, 2, 3], 1);
    let a = plan(&nodes, std::slice::from_ref(&g), LIMITS);
    assert_eq!(
        a,
        vec![Action::ChangePeers {
            group: 7,
            leader: 1,
            conf_ver: 1,
            changes: vec![PeerChange::AddLearner(4)],
            why: "replace a replica on an unfit node"
        }]
    );
    // Catching up: nothing to do.
    let mut g2 = g.clone();
    g2.learners = vec![4];
    g2.progress.push((4, 10, "snapshot".into()));
    assert!(plan(&nodes, std::slice::from_ref(&g2), LIMITS).is_empty());
    // Caught up: promote it and drop the out node in one joint step.
    g2.progress.retain(|p| p.0 != 4);
    g2.progress.push((4, 99, "replicate".into()));
    let a = plan(&nodes, std::slice::from_ref(&g2), LIMITS);
    assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(3)]));
    // Joint: leave.
    let mut g3 = g.clone();
    g3.voters = vec![1, 2, 4];
    g3.voters_outgoing = vec![1, 2, 3];
    let a = plan(&nodes, std::slice::from_ref(&g3), LIMITS);
    assert!(matches!(&a[0], Action::ChangePeers { changes, .. } if changes.is_empty()));
}

#[test]
fn the_meta_group_sheds_a_dead_voter_when_nowhere_can_take_it() {
    let nodes: Vec<NodeInfo> = [
        NodeState::Up,
        NodeState::Up,
        NodeState::Up,
        NodeState::Up,
        NodeState::Out,
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| node(i as u64 + 1, *s))
    .collect();
    let mut meta = group(0, &[1, 2, 3, 4, 5], 1);
    meta.want = 3;
    let a = plan(&nodes, std::slice::from_ref(&meta), LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::Remove(5)]),
        "{a:?}"
    );
    // With a spare node, a dead meta voter is replaced instead.
    let mut nodes6 = nodes.clone();
    nodes6.push(node(6, NodeState::Up));
    meta.want = 5;
    let a = plan(&nodes6, &[meta], LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::AddLearner(6)]),
        "{a:?}"
    );
}

#[test]
fn no_removal_leaves_a_group_without_a_live_majority() {
    // Node 2 is down (rebooting), node 3 drains, three nodes in all:
    // dropping node 3 would leave {1, 2} with one live voter.
    let nodes = [
        node(1, NodeState::Up),
        node(2, NodeState::Down),
        node(3, NodeState::Draining),
    ];
    let mut g = group(1, &[1, 2, 3], 1);
    g.want = 2;
    assert!(plan(&nodes, std::slice::from_ref(&g), LIMITS).is_empty());
    // A caught-up learner replaces the dead voter rather than a live one.
    let nodes = [
        node(1, NodeState::Up),
        node(2, NodeState::Down),
        node(3, NodeState::Up),
        node(4, NodeState::Up),
    ];
    let mut g = group(1, &[1, 2, 3], 1);
    g.learners = vec![4];
    g.progress.push((4, 100, "replicate".into()));
    let a = plan(&nodes, &[g], LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(2)]),
        "{a:?}"
    );
}

#[test]
fn a_down_node_is_not_replaced_but_its_learner_rolls_back() {
    let nodes = [
        node(1, NodeState::Up),
        node(2, NodeState::Up),
        node(3, NodeState::Down),
        node(4, NodeState::Down),
    ];
    assert!(plan(&nodes, &[group(1, &[1, 2, 3], 1)], LIMITS).is_empty());
    let mut g = group(1, &[1, 2, 3], 1);
    g.learners = vec![4];
    let a = plan(&nodes, &[g], LIMITS);
    assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::Remove(4)]));
}

#[test]
fn the_leader_is_moved_before_its_replica_is_replaced() {
    let nodes = [
        node(1, NodeState::Draining),
        node(2, NodeState::Up),
        node(3, NodeState::Up),
        node(4, NodeState::Up),
    ];
    let mut g = group(1, &[1, 2, 3], 1);
    g.learners = vec![4];
    g.progress.push((4, 100, "replicate".into()));
    let a = plan(&nodes, &[g], LIMITS);
    assert!(matches!(&a[0], Action::TransferLeader { to, .. } if *to == 2 || *to == 3));
    // In a joint configuration led by an outgoing voter too.
    let mut j = group(1, &[2, 3, 4], 1);
    j.voters_outgoing = vec![1, 2, 3];
    let a = plan(&nodes, &[j], LIMITS);
    assert!(matches!(&a[0], Action::TransferLeader { .. }));
}

#[test]
fn targets_respect_domains_fullness_and_limits() {
    let mut nodes: Vec<NodeInfo> = (1..=6).map(|i| node(i, NodeState::Up)).collect();
    for (n, d) in nodes.iter_mut().zip(["a", "a", "b", "c", "c", "d"]) {
        n.domain = d.to_string();
    }
    nodes[2].state = NodeState::Out; // node 3, domain b
    nodes[5].nearfull = true; // node 6, the only other new domain
                              // Group on 1 (a), 3 (b), 4 (c): the replacement cannot go to a or c
                              // (used), nor to nearfull 6: nowhere.
    let g = group(1, &[1, 3, 4], 1);
    assert!(plan(&nodes, std::slice::from_ref(&g), LIMITS).is_empty());
    nodes[5].nearfull = false;
    let a = plan(&nodes, std::slice::from_ref(&g), LIMITS);
    assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
        if changes == &vec![PeerChange::AddLearner(6)]));
    // Moves per node: three groups to re-home onto one possible node.
    let groups: Vec<GroupInfo> = (1..=3).map(|i| group(i, &[1, 3, 4], 1)).collect();
    let a = plan(&nodes, &groups, LIMITS);
    assert_eq!(a.len(), 2, "{a:?}");
}

#[test]
fn a_new_node_gets_replicas_one_move_at_a_time_and_leaders_spread() {
    let mut nodes: Vec<NodeInfo> = (1..=3).map(|i| node(i, NodeState::Up)).collect();
    let groups: Vec<GroupInfo> = (1..=6).map(|i| group(i, &[1, 2, 3], 1)).collect();
    // Balanced counts, all led by node 1: spread leadership.
    let a = plan(&nodes, &groups, LIMITS);
    assert!(
        matches!(&a[0], Action::TransferLeader { leader: 1, .. }),
        "{a:?}"
    );
    // A fourth node: replicas move to it.
    nodes.push(node(4, NodeState::Up));
    let a = plan(&nodes, &groups, LIMITS);
    assert_eq!(a.len(), 1);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, why: "rebalance replica counts", .. }
        if changes == &vec![PeerChange::AddLearner(4)])
    );
    // Balanced within one: nothing.
    let spread = [
        [1, 2, 3],
        [1, 2, 4],
        [1, 3, 4],
        [2, 3, 4],
        [1, 2, 3],
        [2, 3, 4],
    ];
    let leaders = [1, 2, 3, 4, 3, 2];
    let groups: Vec<GroupInfo> = spread
        .iter()
        .zip(leaders)
        .enumerate()
        .map(|(i, (v, l))| group(i as u64 + 1, v, l))
        .collect();
    assert!(
        plan(&nodes, &groups, LIMITS).is_empty(),
        "{:?}",
        plan(&nodes, &groups, LIMITS)
    );
}

fn racked(ids_domains: &[(u64, &str)]) -> Vec<NodeInfo> {
    ids_domains
        .iter()
        .map(|(i, d)| NodeInfo {
            domain: d.to_string(),
            ..node(*i, NodeState::Up)
        })
        .collect()
}

#[test]
fn a_node_added_to_an_occupied_rack_takes_replicas_from_that_rack() {
    // Racks a, b, c; node 4 joins rack a.
    let nodes = racked(&[(1, "a"), (2, "b"), (3, "c"), (4, "a")]);
    let groups: Vec<GroupInfo> = (1..=6).map(|i| group(i, &[1, 2, 3], 2)).collect();
    let a = plan(&nodes, &groups, LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, why: "rebalance replica counts", .. }
            if changes == &vec![PeerChange::AddLearner(4)]),
        "{a:?}"
    );
    // Caught up: the voter it replaces is the one in its own rack (node 1),
    // not the fullest by id.
    let mut g = group(1, &[1, 2, 3], 2);
    g.learners = vec![4];
    g.progress.push((4, 100, "replicate".into()));
    let mut groups = groups;
    groups[0] = g;
    let a = plan(&nodes, &groups, LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(1)]),
        "{a:?}"
    );
}

#[test]
fn voters_sharing_a_rack_are_moved_apart_when_a_rack_is_free() {
    // Bootstrap put group 1 on 1 (a), 2 (b), 4 (a); rack c has room.
    let nodes = racked(&[(1, "a"), (2, "b"), (3, "c"), (4, "a")]);
    let g = group(1, &[1, 2, 4], 2);
    let a = plan(&nodes, std::slice::from_ref(&g), LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, why: "voters share a failure domain", .. }
            if changes == &vec![PeerChange::AddLearner(3)]),
        "{a:?}"
    );
    // Promotion gives up a voter of rack a.
    let mut g2 = g.clone();
    g2.learners = vec![3];
    g2.progress.push((3, 100, "replicate".into()));
    let a = plan(&nodes, &[g2], LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddVoter(3), PeerChange::Remove(4)]
                || changes == &vec![PeerChange::AddVoter(3), PeerChange::Remove(1)]),
        "{a:?}"
    );
    // No free rack (all three used by five meta voters): nothing to do.
    let nodes = racked(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]);
    let mut meta = group(0, &[1, 2, 3, 4, 5], 1);
    meta.want = 5;
    assert!(plan(&nodes, &[meta], LIMITS).is_empty());
}

#[test]
fn weight_zero_and_nearfull_nodes_give_their_replicas_away() {
    let mut nodes: Vec<NodeInfo> = (1..=4).map(|i| node(i, NodeState::Up)).collect();
    let groups: Vec<GroupInfo> = (1..=4).map(|i| group(i, &[1, 2, 3], 1)).collect();
    nodes[3].weight = 0;
    // Node 4 has no weight and holds nothing: balanced as it is.
    let a = plan(&nodes, &groups, LIMITS);
    assert!(
        a.iter().all(|x| matches!(x, Action::TransferLeader { .. })),
        "{a:?}"
    );
    // Node 3's weight goes to 0: its replicas go to node 4.
    nodes[3].weight = 100;
    nodes[2].weight = 0;
    let a = plan(&nodes, &groups, LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, why: "move a replica off a node that sheds them", .. }
            if changes == &vec![PeerChange::AddLearner(4)]),
        "{a:?}"
    );
    let mut g = group(1, &[1, 2, 3], 1);
    g.learners = vec![4];
    g.progress.push((4, 100, "replicate".into()));
    let a = plan(&nodes, &[g], LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(3)]),
        "{a:?}"
    );
    // A nearfull node sheds too, even when counts are even.
    nodes[2].weight = 100;
    nodes[1].nearfull = true;
    let spread: Vec<GroupInfo> = [[1, 2, 3], [1, 2, 4], [2, 3, 4], [1, 3, 4]]
        .iter()
        .enumerate()
        .map(|(i, v)| group(i as u64 + 1, v, v[0]))
        .collect();
    let a = plan(&nodes, &spread, LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { group: 1, changes, .. }
            if changes == &vec![PeerChange::AddLearner(4)]),
        "{a:?}"
    );
    // ...but not to where it cannot go: with every other node holding the
    // group, nothing moves.
    let full_groups: Vec<GroupInfo> = (1..=2).map(|i| group(i, &[1, 2, 3, 4], 1)).collect();
    let mut four = full_groups.clone();
    for g in &mut four {
        g.want = 4;
    }
    assert!(
        plan(&nodes, &four, LIMITS)
            .iter()
            .all(|x| !matches!(x, Action::ChangePeers { .. })),
        "{:?}",
        plan(&nodes, &four, LIMITS)
    );
}

#[test]
fn removals_need_a_majority_heard_now_not_merely_not_down() {
    // A meta group of 5 shrinking to 3 after node 5 drained: nodes 3 and
    // 4 died a moment ago (not down yet, so still "live"), but silent.
    let mut nodes: Vec<NodeInfo> = (1..=5).map(|i| node(i, NodeState::Up)).collect();
    nodes[4].state = NodeState::Draining;
    for n in &mut nodes[2..4] {
        n.heard = false;
    }
    let mut meta = group(0, &[1, 2, 3, 4, 5], 1);
    meta.want = 3;
    // Removing node 5 would leave {1, 2, 3, 4} with two heard voters.
    assert!(
        plan(&nodes, std::slice::from_ref(&meta), LIMITS).is_empty(),
        "{:?}",
        plan(&nodes, std::slice::from_ref(&meta), LIMITS)
    );
    // Heard again: the drained voter goes.
    for n in &mut nodes[2..4] {
        n.heard = true;
    }
    let a = plan(&nodes, &[meta], LIMITS);
    assert!(
        matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::Remove(5)]),
        "{a:?}"
    );
}

#[test]
fn a_leader_sending_snapshots_counts_against_the_moves_per_node() {
    // Nodes 1-3 hold four groups, all led by node 1; node 3 is out and
    // nodes 4-7 could each take a replacement: only two start, because
    // node 1 sends every snapshot.
    let mut nodes: Vec<NodeInfo> = (1..=7).map(|i| node(i, NodeState::Up)).collect();
    nodes[2].state = NodeState::Out;
    nodes[2].live = false;
    nodes[2].heard = false;
    let groups: Vec<GroupInfo> = (1..=4).map(|i| group(i, &[1, 2, 3], 1)).collect();
    let a = plan(&nodes, &groups, LIMITS);
    assert_eq!(a.len(), 2, "{a:?}");
    // Led by different nodes, they all start.
    let groups: Vec<GroupInfo> = (1..=4)
        .map(|i| group(i, &[1, 2, 3], [1, 2, 1, 2][i as usize - 1]))
        .collect();
    let a = plan(&nodes, &groups, LIMITS);
    assert_eq!(a.len(), 4, "{a:?}");
    // A move under way (a learner catching up) occupies its leader too.
    let mut busy = group(5, &[1, 2, 3], 1);
    busy.learners = vec![4];
    let mut groups: Vec<GroupInfo> = (1..=2).map(|i| group(i, &[1, 2, 3], 1)).collect();
    groups.push(busy);
    let a = plan(&nodes, &groups, LIMITS);
    assert_eq!(a.len(), 1, "{a:?}");
}
