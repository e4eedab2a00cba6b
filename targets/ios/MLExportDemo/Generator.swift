import CoreML
import Foundation
import Tokenizers

/// Greedy generation with the bundled stateful Core ML model: the KV cache lives in an MLState, the prompt is
/// one prediction (prefill), then one prediction per token. Inputs are those mlexport's Core ML export declares:
/// `input_ids` int32 [1, T] and `causal_mask` fp16 [1, 1, T, past + T]; output `logits` [1, T, vocab].
final class Generator {
    struct Stats { var promptTokens = 0; var generated = 0; var prefillSeconds = 0.0; var decodeSeconds = 0.0 }

    let contract: BundleContract
    private let model: MLModel
    private let tokenizer: Tokenizer

    init() async throws {
        contract = try BundleContract.load()
        guard let url = Bundle.main.url(forResource: "model", withExtension: "mlmodelc") else {
            throw DemoError("model.mlmodelc is missing: bundle the model and rebuild")
        }
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndNeuralEngine
        model = try await MLModel.load(contentsOf: url, configuration: config)
        guard let folder = Bundle.main.resourceURL else { throw DemoError("no resource folder") }
        tokenizer = try await AutoTokenizer.from(modelFolder: folder) // tokenizer.json + tokenizer_config.json
    }

    func generate(_ user: String, maxNewTokens: Int = 256, onText: (String) -> Void) throws -> Stats {
        var stats = Stats()
        let ids = tokenizer.encode(text: contract.prompt(user), addSpecialTokens: false)
        stats.promptTokens = ids.count
        let state = model.makeState()
        let start = Date()
        var logits = try predict(ids, past: 0, state: state)
        var past = ids.count
        var next = argmax(logits, row: ids.count - 1)
        stats.prefillSeconds = Date().timeIntervalSince(start)
        var out: [Int] = []
        let decodeStart = Date()
        while out.count < maxNewTokens, past < contract.maxContext, !contract.eosIds.contains(next) {
            out.append(next)
            onText(tokenizer.decode(tokens: out))
            logits = try predict([next], past: past, state: state)
            past += 1
            next = argmax(logits, row: 0)
        }
        stats.generated = out.count
        stats.decodeSeconds = Date().timeIntervalSince(decodeStart)
        return stats
    }

    private func predict(_ tokens: [Int], past: Int, state: MLState) throws -> MLMultiArray {
        let t = tokens.count
        let ids = try MLMultiArray(shape: [1, NSNumber(value: t)], dataType: .int32)
        for (i, token) in tokens.enumerated() { ids[i] = NSNumber(value: token) }
        let width = past + t
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: t), NSNumber(value: width)], dataType: .float16)
        mask.withUnsafeMutableBufferPointer(ofType: Float16.self) { buffer, strides in
            for q in 0..<t {
                for k in 0..<width { buffer[q * strides[2] + k * strides[3]] = k > past + q ? -30000 : 0 }
            }
        }
        let input = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: ids), "causal_mask": MLFeatureValue(multiArray: mask),
        ])
        let output = try model.prediction(from: input, using: state)
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw DemoError("the model returned no logits")
        }
        return logits
    }

    private func argmax(_ logits: MLMultiArray, row: Int) -> Int {
        let vocab = logits.shape[logits.shape.count - 1].intValue
        let stride = logits.strides[logits.strides.count - 2].intValue
        func best<T: BinaryFloatingPoint>(_ type: T.Type) -> Int {
            logits.withUnsafeBufferPointer(ofType: T.self) { buffer in
                var index = 0
                var top = -T.infinity
                for v in 0..<vocab where buffer[row * stride + v] > top { top = buffer[row * stride + v]; index = v }
                return index
            }
        }
        return logits.dataType == .float16 ? best(Float16.self) : best(Float.self)
    }
}
