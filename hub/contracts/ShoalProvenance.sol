// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// Anchors of Shoal's provenance ledger.
///
/// The hub appends each signed model statement to a hash-chained ledger, then anchors the
/// ledger here: one transaction records the digest of the newest statement together with the
/// ledger head that covers it and every statement before it. A digest is recorded once; anchoring
/// it again changes nothing, so a hub that retries after a lost receipt never anchors twice.
contract ShoalProvenance {
    struct Anchor {
        bytes32 ledgerHead;
        uint64 blockNumber;
    }

    /// The hub's chain account: the only sender that may anchor.
    address public immutable owner;

    mapping(bytes32 => Anchor) private anchors;

    /// Emitted once per statement digest, in the block that anchors it.
    event Anchored(bytes32 indexed statementDigest, bytes32 indexed ledgerHead, string uri);

    error NotOwner(address sender);
    error EmptyDigest();

    constructor() {
        owner = msg.sender;
    }

    /// Records `statementDigest` with the ledger head that covers it. Returns false, and changes
    /// nothing, when the digest is already anchored.
    function anchor(bytes32 statementDigest, bytes32 ledgerHead, string calldata uri)
        external
        returns (bool)
    {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        if (statementDigest == bytes32(0)) revert EmptyDigest();
        if (anchors[statementDigest].blockNumber != 0) return false;
        anchors[statementDigest] = Anchor(ledgerHead, uint64(block.number));
        emit Anchored(statementDigest, ledgerHead, uri);
        return true;
    }

    /// The ledger head and block number a digest was anchored with; zeros when it never was.
    function anchorOf(bytes32 statementDigest)
        external
        view
        returns (bytes32 ledgerHead, uint64 blockNumber)
    {
        Anchor memory a = anchors[statementDigest];
        return (a.ledgerHead, a.blockNumber);
    }
}
